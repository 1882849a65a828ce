"""Which generation run an output holds and which of its shards are finished:
a rerun continues only the same run (config, format version and inputs), and
keeps only the shards that run finished from the same input records."""

from __future__ import annotations

import re
from pathlib import Path

from labelgen import format as fmt
from labelgen.generate.config import EXECUTION_ONLY, GenerateConfig
from labelgen.run.rundir import Mismatch
from labelgen.shards import ShardInfo, shard_counts, shard_info_from_file
from labelgen.store import storage


def input_identity(files: list[Path]) -> dict[str, list[int]]:
    """[size, modification time] of every input file: a resume must read what the run began with."""
    return {str(p): [(st := p.stat()).st_size, st.st_mtime_ns] for p in files}


def inputs_digest(inputs: dict) -> str:
    """One hash of a run's input identity (input_identity)."""
    import hashlib
    import json
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def identity(cfg: GenerateConfig, inputs: dict) -> dict:
    """The run's identity record (run.json)."""
    return {"config_hash": cfg.output_hash(), "format_version": fmt.FORMAT_VERSION, "config": cfg.to_dict(),
            "inputs": inputs}


def compare(cfg: GenerateConfig, inputs: dict, out: str):
    """Why the run recorded in an output is not this one (a Mismatch), or None."""
    def why(previous: dict) -> Mismatch | None:
        written = previous.get("format_version", "1.3 or older")
        if written != fmt.FORMAT_VERSION:
            return Mismatch("--out", f"{out} holds a run started by a labelgen writing format {written}, this one "
                                     f"writes {fmt.FORMAT_VERSION}", "finish it with that version")
        if previous.get("config_hash") != cfg.output_hash():
            prev_cfg = previous.get("config", {})
            changed = sorted(k for k, v in cfg.to_dict().items() if k not in EXECUTION_ONLY and prev_cfg.get(k) != v)
            return Mismatch("--out", f"{out} holds a run with a different config (changed: {', '.join(changed) or 'unknown'})",
                            "choose another --out")
        changed = [f for f, ident in previous.get("inputs", {}).items() if inputs.get(f) != ident]
        changed += [f for f in inputs if f not in previous.get("inputs", {})]
        if changed and not cfg.inputs_changed:
            more = f" ({len(changed) - 1} more)" if len(changed) > 1 else ""
            return Mismatch("--input", f"{changed[0]} changed (size or modification time) since this run started{more}",
                            "restore it, or rerun with --inputs-changed to keep the finished shards whose input "
                            "records are unchanged (the others are redone)", overwrite_helps=False)
        return None
    return why


def owned_tmp(cfg: GenerateConfig):
    """Which leftover tmp files this worker may remove: with several workers
    (started and stopped at different times), only those of its own shards."""
    if cfg.num_workers == 1:
        return None
    own = re.compile(r"^shard-(\d+)" + re.escape(fmt.SHARD_SUFFIX + fmt.TMP_SUFFIX) + "$")
    return lambda name: bool(m := own.match(name)) and int(m.group(1)) % cfg.num_workers == cfg.worker_index


def same_slice(recorded: str | None, digest: str, cfg: GenerateConfig) -> bool:
    """A finished shard was made from these input records: its recorded digest
    matches; one without (written before digests were kept) counts while the
    inputs are unchanged (not with --inputs-changed)."""
    return recorded == digest if recorded is not None else not cfg.inputs_changed


class LocalShards:
    """This worker's shards in a local directory: finished are those under
    their final name that this config made from the same input records;
    they are committed in place (ShardFile renames them), the manifest last."""

    def __init__(self, cfg: GenerateConfig, rd):
        self.out, self.cfg, self.rd = rd.local, cfg, rd

    def done(self, index: int, digest: str) -> bool:
        path = self.out / fmt.shard_name(index)
        if not path.is_file():
            return False
        import pyarrow.parquet as pq
        try:
            meta = fmt.read_file_metadata(pq.read_schema(path).metadata, str(path))
        except Exception:
            return False
        return meta.get("config_hash") == self.cfg.output_hash() and same_slice(meta.get("input_sha256"), digest, self.cfg)

    def info(self, index: int) -> tuple[ShardInfo, int]:
        """(its ShardInfo, how many input records it skipped as bad: in its footer)."""
        path = self.out / fmt.shard_name(index)
        return shard_info_from_file(path, self.cfg.kind), shard_counts(path).get("skipped", 0)

    def closed(self, index: int, info: ShardInfo, counts: dict) -> None:
        """A shard the writer finished: already in place."""

    def finish(self, written: dict[int, ShardInfo], total: int) -> dict[int, ShardInfo]:
        """The shards written now; this worker's shard files at or past the
        input's end (`total` shards: the input shrank since they were
        written) are deleted, so the directory holds what a fresh run writes."""
        for path in storage.list_dir(self.out, "shard-*" + fmt.SHARD_SUFFIX):
            index = fmt.shard_index(path.name)
            if index is not None and index >= total and index % self.cfg.num_workers == self.cfg.worker_index:
                storage.delete(path)
        return written

    def stop(self) -> None:
        pass

    def publish(self, manifest: dict, name: str) -> dict:
        return self.rd.commit_manifest(manifest, name)


def complete_manifest(where, name: str) -> dict | None:
    """The manifest (or partial manifest) `name` in `where` if present, readable
    and every shard it lists is there at its recorded size; else None."""
    import json
    try:
        manifest = json.loads(storage.read_text(where / name, 1 << 28))
        for s in manifest["shards"]:
            if (where / s["name"]).stat().st_size != s["bytes"]:
                return None
    except (OSError, ValueError, KeyError, TypeError, fmt.FormatError):
        return None
    return manifest
