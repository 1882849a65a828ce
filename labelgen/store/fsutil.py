"""The local-disk half of the storage layer (storage.py): crash-safe files
(a fresh tmp + fsync + rename + fsync of the directory), refusing to write
through symlinks, and the flock by which a run holds its output directory
(rundir.py takes it; buckets use a lease instead). The lowest layer: it
imports nothing else of labelgen's but its errors."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from labelgen.errors import InUse, OutputRefused

TMP_SUFFIX = ".tmp"
LOCK_SUFFIX = ".lock"
RUN_LOCK = "labelgen" + LOCK_SUFFIX


def create_fresh(path: Path, text: bool = False):
    """A new file at `path` opened for writing: whatever stood there (a stale
    tmp file, or a symlink planted to redirect the write) is removed first and
    the file is created with O_EXCL, so nothing is ever opened through it."""
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    return os.fdopen(fd, "w" if text else "wb")


@contextlib.contextmanager
def atomic_writer(path: Path, text: bool = False) -> Iterator:
    """Write `path` through a fresh tmp file: on success it is fsynced and
    renamed into place (a reader sees the old file or the new one); on any
    error the tmp file is removed and `path` is untouched."""
    path = Path(path)
    refuse_symlink(path)
    if path.is_dir():
        raise OutputRefused(f"{path}: is a directory; name a file to write")
    # Unique to the process: two workers writing the same file (run.json) must not remove each other's tmp.
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
    f = create_fresh(tmp, text)
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """tmp + fsync + rename + fsync(dir): a reader sees the old file or the new one."""
    with atomic_writer(path) as f:
        f.write(data)


def commit_file(tmp: Path, path: Path) -> None:
    """Rename a finished, fsynced tmp file into place and make the rename durable."""
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def fsync_tree(directory: Path) -> None:
    """fsync every file under `directory` (files a library wrote, before the directory is committed)."""
    for f in Path(directory).rglob("*"):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())


def replace_dir(tmp: Path, final: Path) -> None:
    """Put a finished directory in place of `final` (removed first if there)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def free_bytes(path: Path) -> int | None:
    """Bytes free on the file system holding `path` (None if it cannot be told)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def refuse_symlink(path: Path) -> None:
    """Outputs are written inside their directory: a symlink planted in their
    place (pointing anywhere) is refused, not written through."""
    if Path(path).is_symlink():
        raise OutputRefused(f"{path}: is a symlink; refusing to write through it (remove it and rerun)")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clear_directory(path: Path, only, descend=lambda name: False, prefix: str = "") -> None:
    """Delete the entries of `path` whose names (relative to the directory
    first given, '/'-separated) `only` accepts, and not the directory itself:
    it may be a symlink to where the user keeps labels, and its lock must stay
    on the inode other runs find. A subdirectory `descend` accepts is entered
    instead (its accepted entries go; it goes once empty)."""
    for child in Path(path).iterdir():
        name = prefix + child.name
        if child.is_dir() and not child.is_symlink() and descend(name):
            clear_directory(child, only, descend, name + "/")
            if not any(child.iterdir()):
                child.rmdir()
        elif not only(name):
            continue
        elif child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def is_lock_file(path: Path) -> bool:
    return path.name.endswith(LOCK_SUFFIX)


@contextlib.contextmanager
def _flock(path: Path, shared: bool, what: str) -> Iterator[None]:
    refuse_symlink(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            try:
                h = json.loads(holder)
                holder = f"pid {h['pid']} on {h['host']} since {h['since']}: {h['command']}"
            except (ValueError, KeyError, TypeError):
                holder = holder[:200] or "another process"
            raise InUse(f"{what}: in use by another labelgen run ({holder}); wait for it to end or stop it, "
                              "then rerun") from None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "command": " ".join(sys.argv)[:300]}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        yield
    finally:
        os.close(fd)   # releases the lock; the kernel does the same for a process killed with -9


@contextlib.contextmanager
def run_lock(directory: Path, worker: tuple[int, int] | None = None, refused: tuple = ()) -> Iterator[None]:
    """Hold `directory` (created if missing) for one run: exclusively, or, for
    worker (index, count) of a data-parallel run, shared with the other workers
    plus exclusively for that worker. A second run on the directory (another
    config, a finalize, an import, the same worker twice) is refused at once,
    naming the holder. flock: released when the holder exits however it
    exits, so a run killed with -9 leaves no stale lock; on a network
    filesystem it needs flock support (NFSv4; Lustre mounted with -o flock).
    A body raising one of `refused` (the output is not this run's to take)
    leaves no lock file this call created."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputRefused(f"{directory}: exists and is not a directory")
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    made = []   # the lock files this call created
    with contextlib.ExitStack() as stack:
        locks = [(directory / RUN_LOCK, worker is not None and worker[1] > 1, str(directory))]
        if worker is not None and worker[1] > 1:
            locks.append((directory / f"labelgen.worker-{worker[0]}-of-{worker[1]}{LOCK_SUFFIX}", False,
                          f"{directory} (worker {worker[0]} of {worker[1]})"))
        for path, shared, what in locks:
            existed = path.exists()
            stack.enter_context(_flock(path, shared=shared, what=what))
            made += [] if existed else [path]
        try:
            yield
        except refused:
            for path in made:   # unlinked while held: nothing else was given this output
                path.unlink(missing_ok=True)
            raise
        except BaseException:
            # A run that failed before writing anything leaves no directory it made.
            if created and all(is_lock_file(p) for p in directory.iterdir()):
                for p in directory.iterdir():
                    p.unlink()
                directory.rmdir()
            raise


