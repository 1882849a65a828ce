"""Finishing a data-parallel run: the workers' partial manifests merged into
manifest.json, and which workers have not finished."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from labelgen import format as fmt
from labelgen.errors import FormatError, InUse
from labelgen.generate.resume import complete_manifest, inputs_digest
from labelgen.generate.sinks import GENERATE, PARTIAL_MANIFESTS, commit_manifest
from labelgen.run.rundir import RunDir
from labelgen.store import storage


def finalize(label_dir: Path | str) -> dict:
    """Merge the workers' partial manifests into manifest.json; fail if any
    worker or any shard is missing, or while a worker still runs (locally its
    lock, in a bucket its lease). In a bucket manifest.json is created only
    if absent (two finalizers cannot both win) and the shard objects it does
    not list (left by stopped attempts) are deleted."""
    rd = RunDir(label_dir, GENERATE)
    if not rd.exists():
        raise FormatError(f"{rd}: no such label directory")
    with rd:
        for lease, holder in rd.other_holders()[:1]:
            raise InUse(f"{rd}: a worker still runs ({holder}; lease {lease}); finalize once every worker has "
                              "ended")
        return _finalize(rd)


def _run_record(out) -> dict:
    try:
        run = json.loads(storage.read_text(out / fmt.RUN_FILE))
        int(run["config"]["num_workers"]), run["config_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        raise FormatError(f"{out}: no generation run here ({fmt.RUN_FILE} missing or unreadable)") from None
    return run


def _current(part: dict, run: dict) -> bool:
    """A worker's partial manifest belongs to the run recorded in run.json:
    its config, and the inputs the run last started from (a part written
    before `--inputs-changed` may list shards of records since deleted)."""
    made_from = (part.get("worker") or {}).get("inputs_sha256")
    return part.get("config_hash") == run["config_hash"] and \
        (made_from is None or "inputs" not in run or made_from == inputs_digest(run["inputs"]))


def unfinished_workers(label_dir: Path | str) -> tuple[list[int], int]:
    """(indices of the workers of the run in `label_dir` that have not written
    their partial manifest for this run and its inputs, how many workers the
    run has); reads only. A one-worker run writes no partial manifest: it has
    finished when its manifest.json has."""
    out = storage.location(label_dir)
    run = _run_record(out)
    n = int(run["config"]["num_workers"])
    if n == 1:
        return ([] if complete_manifest(out, fmt.MANIFEST_NAME) is not None else [0]), 1
    done = set()
    for i in range(n):
        try:
            part = json.loads(storage.read_text(out / fmt.partial_manifest_name(i, n)))
        except (OSError, ValueError):
            continue
        if isinstance(part, dict) and _current(part, run):
            done.add(i)
    return sorted(set(range(n)) - done), n


def slurm_array(indices: list[int]) -> str:
    """0,3,5-7: the --array= expression of these task indices."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def _finalize(rd: RunDir) -> dict:
    out = rd.where
    partials = storage.list_dir(out, PARTIAL_MANIFESTS)
    if not partials:
        raise FormatError(f"{out}: no partial manifests (manifest.worker-*.json); did the workers finish?")
    # Each part read once; its shard list kept column-wise (a million entries as dicts would be gigabytes).
    parts, tables = [], []
    for path in partials:
        part = json.loads(storage.read_text(path))
        table = fmt.ShardTable.from_entries(part.pop("shards"), str(path)).table
        tables.append(table.append_column("index", pa.array([fmt.shard_index(x) for x in
                                                             table.column("name").to_pylist()], pa.int64())))
        parts.append(part)
    n = parts[0]["worker"]["num_workers"]
    if any(p["worker"]["num_workers"] != n or p["config_hash"] != parts[0]["config_hash"] for p in parts):
        raise FormatError(f"{out}: partial manifests come from different runs (worker counts or configs differ)")
    seen = {p["worker"]["index"] for p in parts}
    missing_workers = sorted(set(range(n)) - seen)
    if missing_workers:
        raise FormatError(f"{out}: no manifest from worker(s) {', '.join(map(str, missing_workers))} of {n}; rerun them with --resume")
    run = _run_record(out)
    stale = sorted(p["worker"]["index"] for p in parts if not _current(p, run))
    if stale:
        raise FormatError(f"{out}: worker(s) {', '.join(map(str, stale))} finished before the inputs changed (their "
                          f"manifests describe other input records than {fmt.RUN_FILE}); rerun them with --resume "
                          "--inputs-changed")
    total = max(p["worker"]["total_shards"] for p in parts)
    table = pa.concat_tables(tables)
    table = table.take(pc.sort_indices(table.column("index")))
    index = pc.fill_null(table.column("index"), -1).to_numpy()   # -1: a name that is no generated shard's
    have = np.zeros(total, bool)
    have[index[(index >= 0) & (index < total)]] = True
    missing = [fmt.shard_name(int(i)) for i in np.flatnonzero(~have)[:6]]
    if missing:
        raise FormatError(f"{out}: shard(s) missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if len(index) != total:   # a shard listed by two workers, or past the end
        raise FormatError(f"{out}: the workers' manifests list {len(index)} shards for {total}; rerun the workers with "
                          "--resume")
    merged = {k: v for k, v in parts[0].items() if k not in ("worker", "fingerprint")}
    merged["shards"] = fmt.ShardTable(table.drop_columns(["index"]))
    merged["counts"] = {k: sum(p["counts"].get(k, 0) for p in parts) for k in parts[0]["counts"]}
    merged["counts"]["rows"] = int(merged["shards"].column("rows").sum())
    if not merged["counts"]["rows"]:
        raise FormatError(f"{out}: the workers labelled no rows ({merged['counts'].get('skipped', 0)} input records "
                          "skipped as bad); nothing to finalize")
    merged["counts"]["positions"] = int(merged["shards"].column("positions").sum())
    merged["config"] = {**merged["config"], "num_workers": n, "worker_index": None}
    return commit_manifest(rd, merged)
