"""The run directory: the one object through which every output of a labelgen
or student-train command is opened (a label set being generated or imported,
a training run, an on-policy rounds work directory), on local disk or in a
bucket (s3://, gs://).

    rd = RunDir(cfg.out, GENERATE, worker=(0, 1))
    with rd:                                   # the lock: flock here, a lease in a bucket
        previous = rd.claim(resume, overwrite, compare)   # the one output policy
        ...write into rd.local...              # the directory itself, or its local staging copy

It owns, for every command alike:
- where a run writes: `local` is the output directory, or for a bucket output
  a staging directory on this machine (storage.staging_dir) whose finished
  pieces are uploaded;
- the lock: an flock on `local` (released by the kernel however the holder
  dies), and for a bucket a lease object beside the output that other hosts
  respect: created only if absent, renewed by a thread, taken over only once
  it expired (lease.py);
- the policy: `--resume` continues the same run, `--overwrite` deletes what
  runs of this kind write (names in the kind's table, below) and refuses
  where the output holds anything else; a non-empty output is refused
  otherwise, and no refusal recommends deleting data labelgen did not write.
  A bucket's root (or a URI climbing above its prefix with ..) is refused;
- staging: a bucket run works in `local` and uploads what it finishes; the
  commands say what and in which order (generate/sinks.py: shard ->
  progress record -> manifest; student_train/checkpoint.py: checkpoint
  files -> meta.json), calling `check_held` before each commit, so a run
  whose lease was taken over commits nothing.

It knows no command's file names: each command declares its RunKind (the
names it writes, what marks its run, its unit of finished work) from its
own constants.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from labelgen.errors import OutputRefused
from labelgen.run.lease import LEASE_SUFFIX, Lease, lease_name, live_holder
from labelgen.store import fsutil, storage
from labelgen.store.storage import StorePath


@dataclass(frozen=True)
class RunKind:
    """What runs of one command write directly in their output."""
    name: str
    owned: tuple[str, ...]
    """Names (fnmatch patterns) runs of this kind write: all --overwrite may delete."""
    marker: tuple[str, ...]
    """Names that show a run of this kind is there."""
    harmless: tuple[str, ...]
    """Owned names that hold no work to resume or lose (a run that failed at once left only these)."""
    unit: str
    """What its finished work is called (in messages), and its pattern."""
    unit_pattern: str
    record: str | None = None
    """The identity record a rerun is compared with (written by RunDir.record)."""
    resumable: bool = True
    """False: a non-empty output is replaced with --overwrite or refused (no --resume)."""
    local_only: bool = False

    def owns(self, name: str) -> bool:
        """`name` (a path relative to the output, '/'-separated) is this kind's
        to write: a file it writes, or a directory it writes files into."""
        base = re.sub(r"(\.\d+)?" + re.escape(fsutil.TMP_SUFFIX) + "$", "", name).lstrip(".") \
            if name.endswith(fsutil.TMP_SUFFIX) else name
        return _bookkeeping(name) or self.shares(name) or any(fnmatch.fnmatchcase(base, p) for p in self.owned)

    def shares(self, name: str) -> bool:
        """`name` is a directory this kind writes some files into (owned as
        'dir/pattern'), not all of it: --overwrite deletes only those files."""
        return any(p.startswith(name.rstrip("/") + "/") for p in self.owned)


def _bookkeeping(name: str) -> bool:
    """Lock files, leases and tmp files: never content, never foreign."""
    return name.startswith("labelgen") and name.endswith((fsutil.LOCK_SUFFIX, LEASE_SUFFIX))


@dataclass(frozen=True)
class Mismatch:
    """Why an output holds another run than this one: `{option}: {reason}; {remedy}`."""
    option: str
    reason: str
    remedy: str
    overwrite_helps: bool = True


def canonical_path(path: str) -> str:
    """One spelling per path: relative to the working directory when inside
    it, else absolute; no '.', '..' or trailing separators. Default example
    ids are built from input paths, so equal spellings keep them equal. A URI
    is spelled as storage.location does."""
    if "://" in str(path):
        return str(storage.location(path))
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute)
    return absolute if relative == ".." or relative.startswith(".." + os.sep) else relative


def writable_location(out) -> "Path | StorePath":
    """An output's location; a bucket's root, or a URI with '..' in its key, is refused."""
    where = storage.location(out)
    if isinstance(where, StorePath):
        raw = str(out).split("://", 1)[1].partition("/")[2]
        if not where.key or ".." in raw.split("/"):
            raise OutputRefused(f"--out: {out} {'climbs with ..' if '..' in raw.split('/') else 'is a bucket root'}; "
                             f"labelgen writes under a plain prefix of its own (e.g. {where.scheme}://{where.bucket}/labels)")
    return where


class RunDir:
    """One output of one command (see the module's docstring). `worker` is
    (index, count) of a data-parallel generation run; `main` is False on the
    ranks of a distributed training run that write nothing."""

    def __init__(self, out, kind: RunKind, worker: tuple[int, int] | None = None, main: bool = True):
        self.where = writable_location(out)
        self.kind, self.worker, self.main = kind, worker, main
        self.remote = self.where if isinstance(self.where, StorePath) else None
        if self.remote and kind.local_only:
            raise OutputRefused(f"--out: {out}: a {kind.name} keeps its stages on local disk")
        self.spelling = str(self.where) if self.remote else canonical_path(str(out))
        """The output as recorded (one spelling however it was typed)."""
        tag = f"#worker-{worker[0]}-of-{worker[1]}" if worker else ""
        self.local = storage.staging_dir(f"{self.where}{tag}") if self.remote else Path(self.spelling)
        self.lease: Lease | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "RunDir":
        if self.main:
            with self._stack as stack:
                stack.enter_context(fsutil.run_lock(self.local, self.worker, refused=(OutputRefused,)))
                if self.remote:
                    i, n = self.worker or (0, 1)
                    self.lease = stack.enter_context(Lease(self.remote / lease_name(i, n)))
                self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def __str__(self) -> str:
        return self.spelling

    # ------------------------------------------------------------ the policy

    def names(self) -> list[str]:
        if not self.remote and self.where.exists() and not self.where.is_dir():
            raise OutputRefused(f"{self.where}: exists and is not a directory")
        return [p.name for p in storage.list_dir(self.where) if p.name]

    def claim(self, resume: bool, overwrite: bool, compare: Callable[[dict], Mismatch | None] | None = None) -> dict | None:
        """The one output policy. Refuses an output holding anything but a run
        of this kind, or another run than this one (`compare` says why, from
        the identity record that `record` wrote), or this run without
        --resume; with --overwrite deletes what runs of this kind wrote there
        (refused where anything else is there). Returns the identity record
        of the run resumed, or None when it starts afresh."""
        if not self.main:
            return None
        names = self.names()
        content = [n for n in names if not _bookkeeping(n) and not n.endswith(fsutil.TMP_SUFFIX)]
        foreign = [n for n in names if not self.kind.owns(n)]
        work = [n for n in content if self.kind.owns(n) and not _matches(n, self.kind.harmless)]
        done = sum(_matches(n, (self.kind.unit_pattern,)) for n in content)
        if foreign and (overwrite or not any(_matches(n, self.kind.marker) for n in content)):
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            if overwrite:
                raise OutputRefused(f"--overwrite: {self} holds {foreign[0]}{more}, which no labelgen run wrote; "
                                 "--overwrite deletes only what labelgen wrote: move it away or choose another --out")
            raise OutputRefused(f"--out: {self} is not empty and holds no labelgen run ({foreign[0]}{more}); choose "
                             "another --out (pass --resume to continue a run or --overwrite to replace one; neither "
                             "touches files labelgen did not write)")
        if overwrite:
            self.clear()
            return None
        if not work:
            return None
        previous = None
        if compare is not None:
            previous = self.read_record()
            if previous is None:
                raise OutputRefused(f"--out: {self.where / self.kind.record} is missing or unreadable; choose another "
                                 f"--out, or pass --overwrite to delete its {done} {self.kind.unit}(s)")
            why = compare(previous)
            if why is not None:
                helps = f", or pass --overwrite to delete its {done} {self.kind.unit}(s) and start over" \
                    if why.overwrite_helps else ""
                raise OutputRefused(f"{why.option}: {why.reason}; {why.remedy}{helps}")
        if not self.kind.resumable:
            raise OutputRefused(f"{self}: output directory is not empty; pass --overwrite to replace the "
                              f"{self.kind.name} it holds")
        if not resume:
            if previous is not None:
                raise OutputRefused(f"--out: {self} already holds this run; pass --resume to continue it (--overwrite "
                                 f"would delete its {done} {self.kind.unit}(s))")
            raise OutputRefused(f"--out: {self} is not empty; pass --resume to continue the run or --overwrite to start "
                             f"over (deleting its {done} {self.kind.unit}(s))")
        return previous if previous is not None else {}

    def read_record(self) -> dict | None:
        """The identity record (the kind's `record`), or None if missing or unreadable."""
        try:
            record = json.loads(storage.read_text(self.where / self.kind.record, 1 << 24))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def record(self, identity: dict) -> None:
        """Write the identity record a rerun is compared with."""
        storage.write_bytes(self.where / self.kind.record, json.dumps(identity, indent=2).encode())

    def clear(self) -> None:
        """Delete what runs of this kind wrote here (the lock and lease stay;
        so do files a user put into a directory the kind shares with them)."""
        def ours(name: str) -> bool:
            top = name.split("/")[0]
            if self.kind.shares(top):
                return "/" in name and self.kind.owns(name)
            return self.kind.owns(top) and not _bookkeeping(top)
        if self.remote:
            for obj in storage.list_tree(self.remote):
                if ours(obj.key[len(self.remote.key):].lstrip("/")):
                    storage.delete(obj)
        else:
            fsutil.clear_directory(self.local, only=ours, descend=self.kind.shares)

    def exists(self) -> bool:
        return self.where.is_dir()

    def check_held(self) -> None:
        """Before a commit: refuse if another host took this output over."""
        if self.lease is not None:
            self.lease.check()

    # ------------------------------------------------------------ staging and other holders

    def prepare_staging(self, owns_tmp=None) -> None:
        """Leftover tmp files of this worker go; a bucket run's staging starts
        empty (what an earlier attempt did not upload is redone)."""
        if self.remote:
            self.empty_staging()
        for tmp in storage.list_dir(self.local, "*" + fsutil.TMP_SUFFIX):
            if owns_tmp is None or owns_tmp(tmp.name):
                storage.delete(tmp)

    def empty_staging(self) -> None:
        """Everything in the staging directory but the lock held on it (a new lock file would not exclude anyone)."""
        fsutil.clear_directory(self.local, only=lambda name: not _bookkeeping(name))

    def other_holders(self) -> list[tuple[str, str]]:
        """(lease object, its holder) of every other run holding a live lease
        on this bucket output (a data-parallel worker still running)."""
        found = []
        for obj in storage.list_dir(self.remote, "labelgen*" + LEASE_SUFFIX) if self.remote else ():
            if (self.lease is None or obj.name != self.lease.path.name) and (holder := live_holder(obj)):
                found.append((obj.name, holder))
        return found


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
