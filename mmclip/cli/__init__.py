"""Command-line entry points (``mmclip ...``)."""
