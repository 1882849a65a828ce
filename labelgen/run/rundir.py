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
- the commit order of a bucket run: shard -> progress record -> manifest
  (generation's sinks: `shards()`), checkpoint files -> meta.json
  (`push_checkpoint`); a run whose lease was taken over commits nothing.
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

from labelgen import format as fmt
from labelgen.errors import FormatError
from labelgen.run.lease import LEASE_SUFFIX, Lease, lease_name, live_holder
from labelgen.store import fsutil, storage
from labelgen.store.storage import StorePath


class OutputRefused(ValueError):
    """The output holds no run of this kind (foreign files): refused, and left as it was found."""


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


_SHARDS = ("shard-*" + fmt.SHARD_SUFFIX,)
_TOKENIZER = tuple(f"{fmt.TOKENIZER_DIR}/{name}" for name in fmt.TOKENIZER_FILES)
LABELS = RunKind("label set", _SHARDS + (fmt.MANIFEST_NAME, fmt.RUN_FILE) + _TOKENIZER,
                 marker=(fmt.MANIFEST_NAME, fmt.RUN_FILE) + _SHARDS, harmless=(), unit="shard",
                 unit_pattern=_SHARDS[0], record=fmt.RUN_FILE, resumable=False)
# What the library's ShardWriter is given: a directory it may empty when told to (exist="overwrite").
DIRECTORY = RunKind("label set", ("*",), marker=("*",), harmless=(), unit="file", unit_pattern="*", resumable=False)
GENERATE = RunKind("generation run", LABELS.owned + ("manifest.worker-*-of-*.json", "progress.worker-*-of-*.json"),
                   marker=(fmt.RUN_FILE,), harmless=(fmt.RUN_FILE,), unit="finished shard", unit_pattern=_SHARDS[0],
                   record=fmt.RUN_FILE)
TRAIN = RunKind("training run", ("step_*", "metrics.jsonl", "candidate_map-*.npy", "data", "eval_data"),
                marker=("step_*",), harmless=("metrics.jsonl",),
                unit="checkpoint", unit_pattern="step_*")
ROUNDS = RunKind("rounds run", ("rounds.json", "rounds.jsonl", "initial", "round-*"), marker=("rounds.json",),
                 harmless=("rounds.json",), unit="round", unit_pattern="round-*", record="rounds.json", local_only=True)


CHECKPOINT_RE = re.compile(r"^step_(\d{6,})$")   # a training run's checkpoints: OUT/step_NNNNNN/


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
            raise ValueError(f"--out: {out} {'climbs with ..' if '..' in raw.split('/') else 'is a bucket root'}; "
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
            raise ValueError(f"--out: {out}: a {kind.name} keeps its stages on local disk")
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
            raise FormatError(f"{self.where}: exists and is not a directory")
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
                raise ValueError(f"--out: {self.where / self.kind.record} is missing or unreadable; choose another "
                                 f"--out, or pass --overwrite to delete its {done} {self.kind.unit}(s)")
            why = compare(previous)
            if why is not None:
                helps = f", or pass --overwrite to delete its {done} {self.kind.unit}(s) and start over" \
                    if why.overwrite_helps else ""
                raise ValueError(f"{why.option}: {why.reason}; {why.remedy}{helps}")
        if not self.kind.resumable:
            raise FormatError(f"{self}: output directory is not empty; pass --overwrite to replace the "
                              f"{self.kind.name} it holds")
        if not resume:
            if previous is not None:
                raise ValueError(f"--out: {self} already holds this run; pass --resume to continue it (--overwrite "
                                 f"would delete its {done} {self.kind.unit}(s))")
            raise ValueError(f"--out: {self} is not empty; pass --resume to continue the run or --overwrite to start "
                             f"over (deleting its {done} {self.kind.unit}(s))")
        return previous if previous is not None else {}

    def read_record(self) -> dict | None:
        """The identity record (run.json, rounds.json), or None if missing or unreadable."""
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

    def commit_manifest(self, manifest: dict, name: str = fmt.MANIFEST_NAME) -> dict:
        """The run's last write: manifest.json (or a worker's partial manifest
        `name`). In a bucket manifest.json is created only if absent (of two
        finalizers one wins; finalizing the same set again changes nothing),
        then the shard objects it does not list (stopped attempts') are deleted."""
        self.check_held()
        if name != fmt.MANIFEST_NAME or not self.remote:
            return fmt.write_manifest(self.where, manifest, name)
        try:
            written = fmt.write_manifest(self.remote, manifest, if_absent=True)
        except storage.AlreadyExists:
            written = fmt.read_manifest(self.remote)
            if written.get("fingerprint") != fmt.dataset_fingerprint(manifest):
                raise FormatError(f"{self.remote / fmt.MANIFEST_NAME}: already exists and lists other shards (another "
                                  "finalize won, or the run was finalized before); validate it, or delete it to "
                                  "finalize again") from None
        listed = {s["name"] for s in written["shards"]}
        for obj in storage.list_dir(self.remote, "shard-*" + fmt.SHARD_SUFFIX):
            if obj.name not in listed:
                storage.delete(obj)
        return written

    def check_held(self) -> None:
        """Before a commit: refuse if another host took this output over."""
        if self.lease is not None:
            self.lease.check()

    # ------------------------------------------------------------ generation

    def shards(self, cfg):
        """This worker's shard sink: which shards are finished, and the commit
        of those it finishes (locally: in place; in a bucket: uploaded from
        staging, recorded in the worker's progress record, manifest last)."""
        if self.remote:
            from labelgen.generate.sinks import BucketShards
            return BucketShards(cfg, self)
        from labelgen.generate.resume import LocalShards
        return LocalShards(cfg, self)

    def prepare_staging(self, owns_tmp=None) -> None:
        """Leftover tmp files of this worker go; a bucket run's staging starts
        empty (what an earlier attempt did not upload is redone)."""
        if self.remote:
            self._empty_staging()
        for tmp in storage.list_dir(self.local, "*" + fsutil.TMP_SUFFIX):
            if owns_tmp is None or owns_tmp(tmp.name):
                storage.delete(tmp)

    def _empty_staging(self) -> None:
        """Everything in the staging directory but the lock held on it (a new lock file would not exclude anyone)."""
        fsutil.clear_directory(self.local, only=lambda name: not _bookkeeping(name))

    # ------------------------------------------------------------ training

    def pull_checkpoint(self, resume: bool, files: tuple[str, ...]) -> None:
        """Where a training run starts: a bucket run's staging directory starts
        empty, and a resumed one (on any machine) from the bucket's last whole
        checkpoint (its meta.json, uploaded last, is there) and `files`."""
        if not self.main:
            return
        storage.make_dir(self.local)
        if self.remote:
            self._empty_staging()
        if not (self.remote and resume):
            return
        steps = []
        for obj in storage.list_tree(self.remote):
            parts = obj.key[len(self.remote.key):].strip("/").split("/")
            if len(parts) == 2 and parts[1] == "meta.json" and (m := CHECKPOINT_RE.match(parts[0])):
                steps.append(int(m.group(1)))
        if steps:
            name = f"step_{max(steps):06d}"
            storage.download_tree(self.remote / name, self.local / name)
            for f in files:
                if (self.remote / f).is_file():
                    storage.download_file(self.remote / f, self.local / f)

    def push_checkpoint(self, ckpt: Path, files: tuple[str, ...], keep: int = 1) -> None:
        """A saved checkpoint to the bucket (meta.json last: until it is there
        the checkpoint does not count), then `files`; the staging directory then
        keeps only the newest `keep` checkpoints (a spot node's disk stays small)."""
        if not self.remote:
            return
        self.check_held()
        storage.upload_tree(ckpt, self.remote / ckpt.name, last="meta.json")
        for f in files:
            if (self.local / f).is_file():
                storage.upload_file(self.local / f, self.remote / f)
        steps = sorted((int(m.group(1)), p) for p in storage.list_dir(self.local, "step_*")
                       if (m := CHECKPOINT_RE.match(p.name)))
        for _, old in steps[:-keep]:   # by step, not by name: step_1000000 sorts before step_999999
            storage.remove_tree(old)

    # ------------------------------------------------------------ finishing a data-parallel run

    def refuse_live_workers(self) -> None:
        """Refuse while another run holds a lease on this bucket output (a worker still running)."""
        for obj in storage.list_dir(self.remote, "labelgen*" + LEASE_SUFFIX) if self.remote else ():
            if (self.lease is None or obj.name != self.lease.path.name) and (holder := live_holder(obj)):
                raise FormatError(f"{self}: a worker still runs ({holder}; lease {obj.name}); finalize once every "
                                  "worker has ended")


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
