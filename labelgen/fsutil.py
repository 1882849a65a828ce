"""Crash-safe files: atomic writes (tmp + fsync + rename + fsync of the
directory), refusing to write through symlinks, and the hashes a manifest
keeps of each shard."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from labelgen.format.schema import TMP_SUFFIX, FormatError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """tmp + fsync + rename + fsync(dir): a reader sees the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    refuse_symlink(path)
    tmp.unlink(missing_ok=True)   # never write through a stale or planted tmp file
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def refuse_symlink(path: Path) -> None:
    """Outputs are written inside their directory: a symlink planted in their
    place (pointing anywhere) is refused, not written through."""
    if Path(path).is_symlink():
        raise FormatError(f"{path}: is a symlink; refusing to write through it (remove it and rerun)")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def footer_sha256(path: Path) -> str:
    """sha256 of a Parquet file's footer (its metadata, length and magic)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size < 12:
            raise FormatError(f"{path}: {size} bytes, too short for Parquet")
        f.seek(size - 8)
        tail = f.read(8)
        n = int.from_bytes(tail[:4], "little")
        if tail[4:] != b"PAR1" or n + 12 > size:
            raise FormatError(f"{path}: no Parquet footer (truncated or not Parquet)")
        f.seek(size - 8 - n)
        return hashlib.sha256(f.read(n) + tail).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


