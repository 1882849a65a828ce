"""Start-up at pretraining scale, simulated: label sets of N = 10^3 ... 10^6
shards (one real shard hard-linked N times; small objects on moto's S3
server), read as rank r of 1,024 with 4 DataLoader workers, by this code and
by a baseline revision side by side.

    python benchmarks/bench_scale.py                          # N = 1e3, 1e4, 1e5, 1e6 locally; 1e3, 1e4 on S3
    python benchmarks/bench_scale.py --baseline 80aece6       # and the code of that revision beside it
    python benchmarks/bench_scale.py --sizes 1000 --s3-sizes 1000 --finalize 100   # a quick run

Prints, per N: manifest bytes (manifest.json, and the shard table where one
is written), seconds and peak RSS growth (over the smallest set that feeds
every consumer, 1,024 shards of 4 row groups) to open
the set, to plan the loader and to reach the first batch, the peak RSS
growth of a DataLoader worker, and on S3 the requests one rank sends before
its first step and to its first batch (counted at the server); then
finalize of W workers' partial manifests, and the projection for 5T tokens.
The baseline reads sets written as it writes them (every shard inline in
manifest.json); this code writes a shard table past 10,000 shards.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LINKS_PER_COPY = 60_000
RANK, WORLD, WORKERS = 17, 1024, 4
VOCAB, K, SEQ, ROWS = 32_000, 64, 256, 8


def base_shard(work: Path) -> dict:
    """One real top-64 shard (8 windows of 256 tokens, 4 row groups) and its manifest entry."""
    from labelgen import format as fmt
    from labelgen.shards import ShardWriter
    rng = np.random.default_rng(0)
    with ShardWriter(work / "base", "topk", K, VOCAB, encoding=fmt.Encoding(row_group_rows=2), max_rows=ROWS) as w:
        for i in range(ROWS):
            logits = rng.standard_normal((SEQ - 1, K + 1)) * 2   # K entries and the rest of the mass
            lp = np.sort(logits - np.logaddexp.reduce(logits, axis=1, keepdims=True), axis=1)[:, :0:-1].astype(np.float32)
            w.write({"example_id": f"e{i}", "window_offset": 0, "input_ids": rng.integers(0, VOCAB, SEQ),
                     "topk_ids": np.stack([rng.choice(VOCAB, K, replace=False) for _ in range(SEQ - 1)]),
                     "topk_logprobs": lp, "coverage": np.exp(lp).sum(1).clip(0, 1), "target_logprob": lp[:, 0],
                     "target_rank": np.zeros(SEQ - 1, np.int64)})
    return {**w.manifest, "shards": list(w.manifest["shards"])}


def names(n: int) -> list[str]:
    return [f"shard-{i:06d}.parquet" for i in range(n)]


def file_hashes(n: int) -> np.ndarray:
    """Stand-ins for n shards' whole-file sha256, distinct as a real set's are (only --verify and validate read
    the files to compare them; the footer hashes, checked when a shard is opened, stay the one real file's)."""
    return np.random.default_rng(n).bytes(32 * n)


def head_of(base: dict, n: int) -> dict:
    entry = base["shards"][0]
    head = {k: v for k, v in base.items() if k not in ("shards", "fingerprint")}
    head["counts"] = {"rows": entry["rows"] * n, "positions": entry["positions"] * n}
    return head


def write_new(base: dict, out, n: int) -> None:
    """The manifest as this code writes it (a shard table past 10,000 entries)."""
    import pyarrow as pa
    from labelgen import format as fmt
    from labelgen.format.manifest import _schema
    e = base["shards"][0]
    columns = [pa.array(names(n), pa.string())] + [pa.array(np.full(n, e[c], np.int64)) for c in
                                                     ("rows", "positions", "bytes", "row_groups")]
    columns += [pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), n, [None, pa.py_buffer(file_hashes(n))]),
                pa.array([bytes.fromhex(e["footer_sha256"])] * n, pa.binary(32))]
    fmt.write_manifest(out, {**head_of(base, n), "shards": fmt.ShardTable(pa.Table.from_arrays(columns, schema=_schema()))})


def write_old(base: dict, out: Path, n: int) -> None:
    """The manifest as the baseline writes it: every shard inline (format 2.2), fingerprinted as it fingerprints."""
    head = head_of(base, n)
    hashes = file_hashes(n)
    head["shards"] = [{**base["shards"][0], "name": name, "sha256": hashes[32 * i:32 * i + 32].hex()}
                      for i, name in enumerate(names(n))]
    ident = {"format_version": head["format_version"], "kind": head["kind"],
             "tokenizer": head.get("tokenizer", {}).get("fingerprint"),
             "shards": [(s["name"], s["bytes"], s["sha256"]) for s in head["shards"]]}
    head["fingerprint"] = "sha256:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(head, indent=2) + "\n")


def local_set(base_file: Path, base: dict, out: Path, n: int, old: bool) -> Path:
    out.mkdir(parents=True)
    source = base_file
    for i, name in enumerate(names(n)):
        if i % LINKS_PER_COPY == 0 and i:   # ext4 allows 65,000 links to one file: a fresh copy now and then
            source = out.parent / f"{out.name}.base-{i}"
            shutil.copyfile(base_file, source)
        os.link(source, out / name)
    (write_old if old else write_new)(base, out, n)
    return out


# ---------------------------------------------------------------- one measurement, in a process of its own


def _vm(pid: int | str, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) << 10
    return 0


def measure(where: str, stop: str) -> dict:
    """Open `where` as rank RANK of WORLD (to `stop`: open, plan or batch) and report times and peak RSS."""
    import multiprocessing
    import torch
    from student_train.data import LabelStream, open_label_sets
    out, t0 = {}, time.perf_counter()
    readers = open_label_sets([where])
    out["open_s"], out["open_rss"] = time.perf_counter() - t0, _vm("self", "VmHWM")
    if stop == "open":
        return out
    stream = LabelStream(readers, 4, rank=RANK, world_size=WORLD)
    out["plan_s"], out["plan_rss"] = time.perf_counter() - t0, _vm("self", "VmHWM")
    if stop == "plan":
        return out
    loader = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=WORKERS))
    next(loader)
    out["batch_s"], out["batch_rss"] = time.perf_counter() - t0, _vm("self", "VmHWM")
    out["worker_rss"] = max((_vm(p.pid, "VmHWM") for p in multiprocessing.active_children()), default=0)
    return out


def run_measure(code: Path, where, stop: str, env: dict | None = None) -> dict:
    r = subprocess.run([sys.executable, __file__, "--measure", str(where), "--stop", stop], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, **(env or {}), "PYTHONPATH": str(code)})
    if r.returncode != 0:
        raise SystemExit(f"measuring {where} with {code} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- S3 (moto) and finalize


def s3_set(client, base_file: Path, base: dict, prefix: str, n: int, old: bool) -> str:
    bucket = "scale"
    client.upload_file(str(base_file), bucket, f"{prefix}/base.parquet")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda name: client.copy_object(Bucket=bucket, Key=f"{prefix}/{name}",
                                                      CopySource={"Bucket": bucket, "Key": f"{prefix}/base.parquet"}),
                      names(n)))
    uri = f"s3://{bucket}/{prefix}"
    if old:
        with tempfile.TemporaryDirectory() as d:
            write_old(base, Path(d), n)
            client.upload_file(str(Path(d) / "manifest.json"), bucket, f"{prefix}/manifest.json")
    else:
        write_new(base, uri, n)
    return uri


def finalize_set(base: dict, out: Path, n: int, workers: int) -> Path:
    """A generation run's directory as W workers leave it: run.json and their partial manifests (no shard files:
    finalize reads the manifests only)."""
    from labelgen import format as fmt
    out.mkdir(parents=True)
    run = {"config_hash": "x", "config": {"num_workers": workers}, "inputs": {}}
    (out / fmt.RUN_FILE).write_text(json.dumps(run))
    e = base["shards"][0]
    for w in range(workers):
        part = {**head_of(base, 0), "config_hash": "x", "config": {"num_workers": workers},
                "worker": {"index": w, "num_workers": workers, "total_shards": n},
                "shards": [{**e, "name": fmt.shard_name(i)} for i in range(w, n, workers)]}
        part["counts"] = {"rows": e["rows"] * len(part["shards"]), "positions": e["positions"] * len(part["shards"])}
        (out / fmt.partial_manifest_name(w, workers)).write_text(json.dumps(part))
    return out


def run_finalize(code: Path, where: Path) -> dict:
    script = ("import json, sys, time\nfrom labelgen.{m} import finalize, unfinished_workers\nt = time.perf_counter()\n"
              "left, n = unfinished_workers(sys.argv[1])\nm = time.perf_counter() - t\nfinalize(sys.argv[1])\n"
              "print(json.dumps({{'missing_s': m, 'finalize_s': time.perf_counter() - t - m}}))")
    module = "generate.finalize" if (code / "labelgen" / "generate" / "finalize.py").is_file() else "finalize"
    r = subprocess.run([sys.executable, "-c", script.format(m=module), str(where)], capture_output=True, text=True,
                       cwd=code, env={**os.environ, "PYTHONPATH": str(code)})   # -c puts the working directory first
    if r.returncode != 0:
        raise SystemExit(f"finalize with {code} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the run


def checkout(rev: str, work: Path) -> Path:
    dest = work / f"baseline-{rev}"
    dest.mkdir()
    archive = subprocess.run(["git", "archive", rev, "labelgen", "student_train"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def mb(x: float) -> str:
    return f"{x / 2**20:,.0f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--s3-sizes", type=int, nargs="*", default=[1024, 10_000])
    ap.add_argument("--finalize", type=int, nargs="*", default=[100, 10_000], help="worker counts W (10^6 shards)")
    ap.add_argument("--finalize-shards", type=int, default=1_000_000)
    ap.add_argument("--baseline", help="a git revision to measure beside this code (its labelgen/ and student_train/)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--stop", default="batch", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.stop)))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        codes = {"this code": ROOT} | ({f"baseline {args.baseline}": checkout(args.baseline, work)} if args.baseline else {})
        base = base_shard(work)
        base_file = work / "base" / base["shards"][0]["name"]
        print(f"one shard: {base['shards'][0]['bytes']:,} B, {ROWS} windows of {SEQ} tokens, top-{K}, "
              f"{base['shards'][0]['row_groups']} row groups; rank {RANK} of {WORLD}, {WORKERS} DataLoader workers\n")
        print("| code | shards | manifest | open | plan the loader | first batch | peak RSS growth, main | "
              "peak RSS growth, a worker |\n|---|---:|---:|---:|---:|---:|---:|---:|")
        least = -(-WORLD * WORKERS // base["shards"][0]["row_groups"])   # the smallest set that feeds every consumer
        for label, code in codes.items():
            old = label != "this code"
            empty = run_measure(code, local_set(base_file, base, work / f"{label}-least", least, old), "batch")
            for n in args.sizes:
                where = local_set(base_file, base, work / f"{label}-{n}", n, old)
                size = sum(p.stat().st_size for p in where.glob("manifest*"))
                r = run_measure(code, where, "batch")
                print(f"| {label} | {n:,} | {mb(size)} | {r['open_s']:.2f} s | {r['plan_s']:.2f} s | {r['batch_s']:.2f} s | "
                      f"{mb(r['batch_rss'] - empty['batch_rss'])} | {mb(r['worker_rss'] - empty['worker_rss'])} |",
                      flush=True)
                shutil.rmtree(where)
        if args.s3_sizes:
            sys.path.insert(0, str(ROOT / "tests"))
            from helpers import MotoServer   # the tests' S3 API on loopback, which counts the requests it answers
            import boto3
            server = MotoServer()
            env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.port}", "AWS_ACCESS_KEY_ID": "bench",
                   "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1", "LABELGEN_CACHE": str(work / "cache")}
            client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                                  aws_access_key_id="bench", aws_secret_access_key="bench")
            client.create_bucket(Bucket="scale")
            os.environ.update(env)   # this process writes the manifests through labelgen's storage layer too
            from labelgen.store import storage
            storage.filesystem.cache_clear()
            storage._boto3_client.cache_clear()
            print("\n| code | shards in the bucket | requests to start (open + plan) | seconds | requests to the first batch "
                  "| seconds |\n|---|---:|---:|---:|---:|---:|")
            for label, code in codes.items():
                for n in args.s3_sizes:
                    uri = s3_set(client, base_file, base, f"{label.replace(' ', '-')}-{n}", n, label != "this code")
                    counts = []
                    for stop in ("plan", "batch"):
                        server.requests.clear()
                        r = run_measure(code, uri, stop, env)
                        counts.append((len(server.requests), r[f"{stop}_s"]))
                    print(f"| {label} | {n:,} | {counts[0][0]} | {counts[0][1]:.2f} | {counts[1][0]} | {counts[1][1]:.2f} |",
                          flush=True)
            server.stop()
        if args.finalize:
            print("\n| code | workers | shards | --missing | finalize |\n|---|---:|---:|---:|---:|")
            for label, code in codes.items():
                for w in args.finalize:
                    where = finalize_set(base, work / f"final-{label}-{w}", args.finalize_shards, w)
                    r = run_finalize(code, where)
                    print(f"| {label} | {w:,} | {args.finalize_shards:,} | {r['missing_s']:.1f} s | {r['finalize_s']:.1f} s |",
                          flush=True)
                    shutil.rmtree(where)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
