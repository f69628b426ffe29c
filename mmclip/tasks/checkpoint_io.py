"""Atomic checkpoint files: a kill at any moment of a save leaves the previous checkpoint or the new one,
never a torn file, and the temporaries of killed writers are cleaned at the next save in the folder.

Lightning's own save streams through fsspec, whose local "transaction" writes the temporary file under
``TMPDIR`` and then moves it: when ``TMPDIR`` is on another filesystem than the run folder (``/dev/shm``,
a node-local disk) the move is a copy, and a kill during the copy truncates ``last.ckpt``. Here the
temporary file lives next to its destination, is fsynced and then renamed over it (``os.replace`` is atomic
within one filesystem), and the folder is fsynced so the rename survives a power loss too.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "clean_stale_temporaries", "is_checkpoint_temporary"]

log = logging.getLogger("mmclip")

_TMP_MARK = ".mmclip-tmp@"  # temporaries are named .<name>.mmclip-tmp@<host>@<pid>@<random>
_FOREIGN_HOST_AGE_S = 24 * 3600.0  # another host's temporary is stale only when this old (its pid is unknown)


def is_checkpoint_temporary(name: str) -> bool:
    """Whether a file name is one of :class:`AtomicCheckpointIO`'s temporaries."""
    return name.startswith(".") and _TMP_MARK in name


def _writer_alive(host: str, pid: int) -> bool | None:
    """Whether the process that wrote a temporary still runs; None when it ran on another host."""
    if host != socket.gethostname():
        return None
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def clean_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Removes the temporaries that killed writers left in ``folder``; returns the removed paths.

    A temporary is stale when its writer (host and pid are in its name) no longer runs on this host, or,
    written on another host, when it is older than a day. Temporaries of live writers are kept, so two
    processes may save into one folder.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not is_checkpoint_temporary(entry.name):
            continue
        try:
            host, pid_text, _ = entry.name.split(_TMP_MARK, 1)[1].split("@")
            alive = _writer_alive(host, int(pid_text))
        except ValueError:  # not a name this module wrote: leave it
            continue
        if alive is None:
            with suppress(OSError):
                alive = time.time() - entry.stat().st_mtime < _FOREIGN_HOST_AGE_S
        if alive:
            continue
        with suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    if removed:
        log.warning("removed %d temporary checkpoint file(s) of interrupted saves in %s", len(removed), folder)
    return removed


def _fsync_dir(folder: Path) -> None:
    """Makes a rename in ``folder`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic: temporary file in the destination folder, fsync,
    rename. Remote paths (``s3://``, ...) keep Lightning's fsspec save."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} takes no storage_options (local files); got {storage_options!r}"
            )
        path = Path(str(path).removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(path.parent)
        tmp = path.parent / f".{path.name}{_TMP_MARK}{socket.gethostname()}@{os.getpid()}@{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to a plain save
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)
        log.debug("saved checkpoint %s", path)
