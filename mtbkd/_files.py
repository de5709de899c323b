"""File helpers shared by the modules: hashing files, and writing tensors readably.

``safetensors``' ``save_file`` creates its file with mode 0600 whatever the umask (it writes
through a private temporary file), so a run folder's samples, student and per-row file could not be
read by another user of a shared machine (``mtbkd predict --run DIR``), unlike every other file
the run writes. :func:`save_safetensors` gives them the mode an ordinary ``open()`` would.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor


@functools.cache
def _default_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (read once: setting
    the umask to read it is process-wide)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def make_readable(path: str | os.PathLike) -> None:
    """Give ``path`` the mode of a file created by ``open()``; a file that is not ours (or a
    file system without modes) is left as it is."""
    try:
        os.chmod(path, _default_mode())
    except OSError:
        pass


def save_safetensors(
    tensors: Mapping[str, Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """``safetensors.torch.save_file``, then :func:`make_readable`. A failed write (a missing
    folder, a full disk) is an ``OSError`` naming the path, not safetensors' own error class,
    which an ``except OSError`` would miss."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(dict(tensors), os.fspath(path), metadata=dict(metadata) if metadata else None)
    except SafetensorError as exc:
        raise OSError(f"cannot write {os.fspath(path)}: {exc}") from None
    make_readable(path)
    return Path(path)


def hash_file(h, path: str | os.PathLike):
    """Feed the bytes of ``path`` into the hashlib object ``h`` in 1 MiB blocks; returns ``h``."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file's bytes (read afresh: never memoised)."""
    return hash_file(hashlib.sha256(), path).hexdigest()
