"""Sampled soft labels against top-k, on one teacher and corpus, in one run.

    python benchmarks/bench_sampled.py [--teacher demo/teacher] [--quick]

Table 1: bytes per position of sampled labels (N = 50) against top-k at
k = 12, 32 and 64 (target: sampled <= 24 B/position).
Table 2: held-out CE and KL to the teacher of students trained with the same
budget on sampled labels, top-12 and top-64 KD, CE only, and online
full-vocabulary KD from the frozen teacher (the upper bound).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from report import (FULL, QUICK, final_metrics, label_sets, make_labels, split_corpus, train_students)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="demo/teacher")
    ap.add_argument("--corpus", nargs="*")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    from labelgen.generate.config import GenerateConfig
    from labelgen.generate import run
    from labelgen.tools.inspection import inspect
    scale = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="bench_sampled_"))
    _, text, heldout = split_corpus(args.corpus, scale, work)
    sets = label_sets(text, work / "prompts.jsonl", scale)
    labels = make_labels(args.teacher, {n: sets[n] for n in ("tokens", "top12", "top32", "top64", "sampled50")},
                         work / "labels", scale)
    run(GenerateConfig(teacher=args.teacher, inputs=(str(heldout),), out=str(work / "eval_labels"), k=64,
                       max_seq_len=scale.max_seq_len, progress=False, device="cpu"))
    print("\n| labels | B/position | entries/position | B/entry |\n|---|---:|---:|---:|")
    for name in ("sampled50", "top12", "top32", "top64"):
        r = inspect(labels[name]["dir"])
        entries = r["unique_per_position"] if name == "sampled50" else r["k"]
        print(f"| {name} | {r['bytes_per_position']:.1f} | {entries:.1f} | {r['bytes_per_position'] / entries:.2f} |")
    runs = {"CE only": dict(labels="tokens", loss="ce"),
            "top-12 KD (tail)": dict(labels="top12", loss="kd", tail="tail"),
            "top-64 KD (tail)": dict(labels="top64", loss="kd", tail="tail"),
            "sampled KD (N=50)": dict(labels="sampled50", loss="kd")}
    students = train_students(labels, runs, work / "eval_labels", args.teacher, text, heldout, work / "students",
                              scale, None)
    print(f"\nstudents: {scale.student_steps} steps x {scale.batch_size} windows of {scale.max_seq_len} tokens\n")
    print("| student | held-out CE | KL to teacher | top-1 agreement |\n|---|---:|---:|---:|")
    for name, r in students.items():
        f = r.get("final") or final_metrics(r["dir"])
        print(f"| {name} | {f['eval_ce']:.3f} | {f['eval_kl']:.3f} | {f['eval_top1']:.3f} |")
    print(json.dumps({"work": str(work)}))


if __name__ == "__main__":
    main()
