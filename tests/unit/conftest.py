"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

from mmclip.tokenizers import get_tokenizer


@pytest.fixture(scope="session")
def clip_tokenizer():
    """CLIP's tokenizer, built once (each data module would otherwise load the vocabulary again)."""
    return get_tokenizer("clip")
