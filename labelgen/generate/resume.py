"""Which generation run an output holds and which of its shards are finished:
a rerun continues only the same run (config, format version and inputs), and
keeps only the shards that run finished from the same input records."""

from __future__ import annotations

import re
from pathlib import Path

from labelgen import format as fmt
from labelgen.generate.config import EXECUTION_ONLY, GenerateConfig
from labelgen.run.rundir import Mismatch
from labelgen.store import storage


def input_identity(files: list[Path]) -> dict[str, list[int]]:
    """[size, modification time] of every input file: a resume must read what the run began with."""
    return {str(p): [(st := p.stat()).st_size, st.st_mtime_ns] for p in files}


def recorded_workers(out) -> int | None:
    """How many data-parallel workers the generation run recorded in `out` (its run.json) has, if one is there."""
    import json
    try:
        return int(json.loads(storage.read_text(storage.location(out) / fmt.RUN_FILE, 1 << 24))["config"]["num_workers"])
    except (OSError, ValueError, KeyError, TypeError, fmt.FormatError):
        return None


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
        if not fmt.continues(written, cfg.encoding):
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


def complete_manifest(where, name: str) -> dict | None:
    """The manifest (or partial manifest) `name` in `where` if present, readable
    and every shard it lists is there at its recorded size; else None."""
    import json
    try:
        manifest = fmt.read_manifest(where) if name == fmt.MANIFEST_NAME else \
            json.loads(storage.read_text(where / name, 1 << 28))
        for s in manifest["shards"]:
            if (where / s["name"]).stat().st_size != s["bytes"]:
                return None
    except (OSError, ValueError, KeyError, TypeError, fmt.FormatError):
        return None
    return manifest
