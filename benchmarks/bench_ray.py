"""Ray's overhead on a generation run, measured side by side in one run:
the same N units run one after another in this process (`--worker i/N`,
then finalize) and as Ray tasks on a local Ray instance with one CPU (so
they also run one after another). The difference, per unit, is what Ray's
start-up, scheduling and worker processes cost.

    python benchmarks/bench_ray.py --teacher DIR [--units 4] [--docs 80]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="an HF teacher directory (a small one: this is about overhead)")
    ap.add_argument("--units", type=int, default=4)
    ap.add_argument("--docs", type=int, default=80, help="stdlib files labelled (first 3,000 characters of each)")
    args = ap.parse_args()
    import ray
    from labelgen.generate.config import GenerateConfig
    from labelgen.tools.demo import read_corpus
    from labelgen.generate.finalize import finalize
    from labelgen.generate import run
    from labelgen.generate.ray_units import RayConfig, run_on_ray
    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    inputs = work / "docs.jsonl"
    inputs.write_text("".join(json.dumps({"text": t[:3000]}) + "\n" for t in read_corpus(None, 4_000_000)[: args.docs]))
    cfg = GenerateConfig(teacher=args.teacher, inputs=(str(inputs),), out="", k=16, max_seq_len=256,
                         rows_per_shard=max(1, args.docs // (2 * args.units)), progress=False, device="cpu",
                         num_workers=args.units)
    t0 = time.perf_counter()
    for i in range(args.units):
        run(dataclasses.replace(cfg, out=str(work / "by_hand"), worker_index=i))
    m = finalize(work / "by_hand")
    by_hand = time.perf_counter() - t0
    t0 = time.perf_counter()
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=200 << 20, log_to_driver=False,
             configure_logging=False)
    started = time.perf_counter() - t0
    t1 = time.perf_counter()
    run_on_ray(dataclasses.replace(cfg, out=str(work / "ray")), RayConfig(address="auto", cpus_per_unit=1))
    on_ray = time.perf_counter() - t1
    ray.shutdown()
    print(f"{args.units} units, {m['counts']['positions']:,} positions, teacher {args.teacher}, {os.cpu_count()} CPU cores")
    print("| what | seconds |\n|---|---:|")
    print(f"| units one after another in this process, then finalize | {by_hand:.1f} |")
    print(f"| ray.init (a local instance) | {started:.1f} |")
    print(f"| the same units as Ray tasks on 1 CPU (one after another), then finalize | {on_ray:.1f} |")
    print(f"\nRay's overhead: {(on_ray - by_hand) / args.units:+.2f} s per unit (scheduling, worker processes), "
          f"plus {started:.1f} s to start a local instance once")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
