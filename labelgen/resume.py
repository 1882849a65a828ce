"""Which run an output directory holds and what of it is finished: a rerun
continues only the same run (config and inputs), and only its finished shards
are kept."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from labelgen import format as fmt
from labelgen import fsutil, storage
from labelgen.config import EXECUTION_ONLY, GenerateConfig
from labelgen.shards import ShardInfo, prepare_output_dir, shard_counts, shard_info_from_file


def canonical_path(path: str) -> str:
    """One spelling per path: relative to the working directory when inside
    it, else absolute; no '.', '..' or trailing separators. Default example
    ids are built from input paths, so equal spellings keep them equal."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute)
    return absolute if relative == ".." or relative.startswith(".." + os.sep) else relative


def input_identity(files: list[Path]) -> dict[str, list[int]]:
    """[size, modification time] of every input file: a resume must read what the run began with."""
    return {str(p): [(st := p.stat()).st_size, st.st_mtime_ns] for p in files}


def owned_tmp(cfg: GenerateConfig):
    """Which leftover tmp files this worker may remove: with several workers
    (started and stopped at different times), only those of its own shards."""
    if cfg.num_workers == 1:
        return None
    own = re.compile(r"^shard-(\d+)" + re.escape(fmt.SHARD_SUFFIX + fmt.TMP_SUFFIX) + "$")
    return lambda name: bool(m := own.match(name)) and int(m.group(1)) % cfg.num_workers == cfg.worker_index


def check_output_dir(cfg: GenerateConfig, files: list[Path], out) -> dict | None:
    """Refuse a non-empty output directory (or bucket prefix) unless resuming
    the same run or overwriting; refuse to resume under a changed config or
    changed inputs; then record the run (run.json). Returns the manifest of a
    bucket run that is already complete (nothing to do), else None."""
    remote = isinstance(out, storage.StorePath)
    inputs = input_identity(files)
    run_file = out / fmt.RUN_FILE
    present = storage.list_dir(out)
    finished = [p for p in present if fmt.shard_index(p.name) is not None]
    # A run that failed before its first shard left only run.json: nothing to resume or lose.
    # Tmp files do not count either: another worker of the run may be writing run.json at this moment.
    started = any(p.name != fmt.RUN_FILE and not fsutil.is_lock_file(p) and not p.name.endswith(fmt.TMP_SUFFIX)
                  for p in present)
    if started and not cfg.overwrite:
        if not run_file.is_file():
            raise ValueError(f"--out: {out} is not empty and holds no labelgen run; choose another directory or pass --overwrite")
        try:
            previous = json.loads(storage.read_text(run_file))
        except (OSError, ValueError) as e:
            raise ValueError(f"--out: {run_file} is unreadable ({e}); choose another --out, or pass --overwrite "
                             f"to delete its {len(finished)} finished shard(s)") from None
        written = previous.get("format_version", "1.3 or older")
        if written != fmt.FORMAT_VERSION:
            raise ValueError(f"--out: {out} holds a run started by a labelgen writing format {written}, this one writes "
                             f"{fmt.FORMAT_VERSION}; finish it with that version, or pass --overwrite to delete its "
                             f"{len(finished)} finished shard(s) and start over")
        if previous.get("config_hash") != cfg.output_hash():
            prev_cfg = previous.get("config", {})
            changed = sorted(k for k, v in cfg.to_dict().items() if k not in EXECUTION_ONLY and prev_cfg.get(k) != v)
            raise ValueError(f"--out: {out} holds a run with a different config (changed: {', '.join(changed) or 'unknown'}); "
                             f"choose another --out, or pass --overwrite to delete its {len(finished)} finished shard(s) and start over")
        changed_inputs = [f for f, ident in previous.get("inputs", {}).items() if inputs.get(f) != ident]
        if changed_inputs:
            raise ValueError(f"--input: {changed_inputs[0]} changed (size or modification time) since this run started"
                             f"{f' ({len(changed_inputs) - 1} more)' if len(changed_inputs) > 1 else ''}; restore it, "
                             f"or pass --overwrite to delete the run's {len(finished)} finished shard(s) and start over")
        if not cfg.resume and cfg.num_workers == 1:
            raise ValueError(f"--out: {out} already holds this run; pass --resume to continue it "
                             f"(--overwrite would delete its {len(finished)} finished shard(s))")
        if remote and (out / fmt.MANIFEST_NAME).is_file():   # a manifest in a bucket is created once
            return fmt.read_manifest(out)
    if remote:
        if cfg.overwrite:
            storage.delete_tree(out)
    else:
        prepare_output_dir(out, "overwrite" if cfg.overwrite else "resume", owns=owned_tmp(cfg))
    storage.write_bytes(run_file, json.dumps({"config_hash": cfg.output_hash(), "format_version": fmt.FORMAT_VERSION,
                                              "config": cfg.to_dict(), "inputs": inputs}, indent=2).encode())
    return None


def is_finished(path: Path, cfg: GenerateConfig) -> bool:
    """A shard is finished when it exists under its final name and was made
    by this config (a stale shard from another config is redone)."""
    if not path.is_file():
        return False
    import pyarrow.parquet as pq
    try:
        meta = fmt.read_file_metadata(pq.read_schema(path).metadata, str(path))
    except Exception:
        return False
    return meta.get("config_hash") == cfg.output_hash()


class LocalShards:
    """The finished shards of a run in a local directory: those under their
    final name that this config made."""

    def __init__(self, cfg: GenerateConfig):
        self.out, self.cfg = Path(cfg.out), cfg

    def done(self, index: int) -> bool:
        return is_finished(self.out / fmt.shard_name(index), self.cfg)

    def info(self, index: int) -> tuple[ShardInfo, int]:
        """(its ShardInfo, how many input records it skipped as bad: in its footer)."""
        path = self.out / fmt.shard_name(index)
        return shard_info_from_file(path, self.cfg.kind), shard_counts(path).get("skipped", 0)
