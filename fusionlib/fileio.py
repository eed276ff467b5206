"""Writing files so that a killed run never leaves half a file behind.

Every file the library writes -- weights, configs, histories, results,
region-feature caches, checkpoint manifests -- goes through :func:`atomic_write`:
the content is written to a temporary file in the same folder and then moved
over the target with :func:`os.replace`, which is atomic on POSIX and Windows.
A reader therefore sees the old file or the new one, never a torn one, and a
training run killed mid-save (chapter 1, "How to run this book") resumes from
the last complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "replace_dir", "sha256_file"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then move it onto ``path``.

    ``write`` receives a path (not an open file) so that libraries that open
    files themselves, such as ``safetensors.torch.save_file``, can be used.
    Returns ``path`` as a string. The temporary file is removed if ``write`` fails.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private (0600); give it the mode open() would have: 0666 less the umask.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> str:
    """Write ``obj`` as JSON to ``path`` atomically (keys kept in insertion order, newline at the end)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def replace_dir(target: str | os.PathLike, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_dir)`` on a fresh folder ``target + ".tmp"``, then swap it in for ``target``.

    A folder cannot be replaced atomically, so the old one is first renamed to
    ``target + ".old"`` and removed only after the new one is in place: at every
    moment either ``target`` or ``target + ".old"`` is complete, and a reader
    that finds no ``target`` can recover from ``.old`` (as
    :func:`fusionlib.train.train` does when it resumes).
    """
    target = os.path.abspath(os.fspath(target))
    tmp, old = target + ".tmp", target + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(target):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """The SHA-256 hex digest of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()
