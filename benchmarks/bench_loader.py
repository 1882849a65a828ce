"""Loader and student-step benchmark, measured side by side in one run.

    python benchmarks/bench_loader.py --labels DIR      # e.g. demo/labels after `make demo`
    python benchmarks/bench_loader.py --teacher DIR     # make labels with a (small) teacher first

Prints: rows/s and positions/s of the label loader alone against the
positions/s a small student consumes (target: loader >= 10x); peak RSS of a
process that reads a label set of N shards and of one 10x as large (target:
within +10 %); and the student's step time with top-k KD (k = 64) against
CE only (target: KD <= 1.15x CE).

    python benchmarks/bench_loader.py --labels DIR --bucket

also streams the same set from an S3 API (moto's server on localhost, needs
the test extra) beside local disk: positions/s of each, their ratio (target
>= 0.8), and the peak RSS of streaming 1x and 10x the shards from each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

STUDENT = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024,
           "tie_word_embeddings": True}


def make_labels(teacher: str, out: Path) -> Path:
    from labelgen.generate.config import GenerateConfig
    from labelgen.tools.demo import read_corpus
    from labelgen.generate import run
    corpus = out.parent / "corpus.jsonl"
    with open(corpus, "w") as f:
        for t in read_corpus(None, 1_500_000):
            f.write(json.dumps({"text": t}) + "\n")
    run(GenerateConfig(teacher=teacher, inputs=(str(corpus),), out=str(out), k=64, max_seq_len=256,
                       rows_per_shard=16, progress=False, encoding={"row_group_rows": 32}))
    return out


def replicate(src: Path, dst: Path, times: int) -> Path:
    """A label set listing every shard of `src` `times` times (hard links)."""
    m = json.loads((src / "manifest.json").read_text())
    dst.mkdir(parents=True)
    shards = []
    for rep in range(times):
        for s in m["shards"]:
            name = f"rep{rep:02d}-{s['name']}"
            os.link(src / s["name"], dst / name)
            shards.append({**s, "name": name})
    shutil.copytree(src / "tokenizer", dst / "tokenizer")
    (dst / "manifest.json").write_text(json.dumps({**m, "shards": shards}))
    return dst


def loader_rate(label_dir: Path, batch_size: int, num_workers: int, checksums: bool = True,
                cross=None) -> tuple[float, float]:
    from student_train.data import LabelStream, open_label_sets
    stream = LabelStream(open_label_sets([str(label_dir)], checksums=checksums), batch_size, max_epochs=1, k=64,
                         cross=cross)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
    rows = positions = 0
    t0 = time.perf_counter()
    for batch, _ in loader:
        rows += len(batch["input_ids"])
        positions += int(batch["mask"].sum())
    dt = time.perf_counter() - t0
    return rows / dt, positions / dt


def cross_loader_rate(label_dir: Path, batch_size: int, student_tokenizer: str | None, work: Path):
    """Loader rate re-tokenizing for another tokenizer, and the seconds its candidate map took."""
    from transformers import AutoTokenizer
    from labelgen.tools.demo import read_corpus, train_tokenizer
    from student_train.vocab import load_tokenizer_for
    from student_train.xtok import CrossTokenizer
    if student_tokenizer is None:
        student_tokenizer = str(work / "student_tokenizer")
        train_tokenizer(read_corpus(None, 400_000)[::-1], 8192).save_pretrained(student_tokenizer)
    t0 = time.perf_counter()
    cross = CrossTokenizer(load_tokenizer_for(None, label_dir), AutoTokenizer.from_pretrained(student_tokenizer))
    map_s = time.perf_counter() - t0
    return (*loader_rate(label_dir, batch_size, 0, cross=cross), map_s)


def peak_rss_mb(label_dir: Path) -> float:
    """Peak RSS of a fresh process that streams the whole label set once."""
    code = ("import resource, sys, torch\n"
            "from student_train.data import LabelStream, open_label_sets\n"
            f"s = LabelStream(open_label_sets([{str(label_dir)!r}]), 8, max_epochs=1, k=64)\n"
            "n = sum(len(b['input_ids']) for b, _ in s)\n"
            "print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[1])


def start_moto(bucket: str):
    """A moto S3 server on localhost with an empty `bucket`; the environment
    points pyarrow and boto3 at it. Returns (boto3 client, server to stop)."""
    import logging
    import socket
    import boto3
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    return s3, server


def serve_bucket(labels: Path, times: int) -> tuple[str, str, object]:
    """A moto S3 server on localhost holding `labels` (as s3://bench/x1) and a
    set listing its shards `times` times (s3://bench/x10); the environment
    points pyarrow at it. Returns the two URIs and the server (to stop)."""
    s3, server = start_moto("bench")
    for p in labels.rglob("*"):
        if p.is_file() and not p.name.endswith(".lock"):
            s3.upload_file(str(p), "bench", f"x1/{p.relative_to(labels)}")
    m = json.loads((labels / "manifest.json").read_text())
    shards = []
    for rep in range(times):
        for sh in m["shards"]:
            name = f"rep{rep:02d}-{sh['name']}"
            s3.copy_object(Bucket="bench", Key=f"x{times}/{name}", CopySource={"Bucket": "bench", "Key": f"x1/{sh['name']}"})
            shards.append({**sh, "name": name})
    s3.put_object(Bucket="bench", Key=f"x{times}/manifest.json", Body=json.dumps({**m, "shards": shards}).encode())
    return "s3://bench/x1", f"s3://bench/x{times}", server


def bucket_report(labels: Path, batch_size: int) -> None:
    one, ten, server = serve_bucket(labels, 10)
    try:
        rates = {"local": [], "bucket": []}
        for _ in range(3):   # alternated, so drift on a busy machine hits both alike
            rates["local"].append(loader_rate(labels, batch_size, 0)[1])
            rates["bucket"].append(loader_rate(one, batch_size, 0)[1])
        local, bucket = (sorted(v)[1] for v in rates.values())
        print("\n| loader, main process (median of 3) | positions/s |\n|---|---:|")
        print(f"| local disk (page cache warm) | {local:,.0f} |\n| S3 API on localhost (moto server) | {bucket:,.0f} |")
        print(f"bucket / local = {bucket / local:.2f}  (target >= 0.8)")
        big = replicate(labels, Path(tempfile.mkdtemp(prefix="bench_loader_")) / "x10", 10)
        rss = {(where, n): peak_rss_mb(d) for (where, n), d in
               {("local", 1): labels, ("bucket", 1): one, ("local", 10): big, ("bucket", 10): ten}.items()}
        shutil.rmtree(big.parent, ignore_errors=True)
        for n in (1, 10):
            print(f"peak RSS streaming {n}x the shards: local {rss['local', n]:,.0f} MB, bucket {rss['bucket', n]:,.0f} MB; "
                  f"bucket / local {rss['bucket', n] / rss['local', n]:.3f}")
    finally:
        server.stop()


def student_rate(label_dir: Path, loss: str, batch_size: int, steps: int) -> tuple[float, float]:
    """(seconds per optimizer step, positions per second) of a small student."""
    from student_train.config import TrainConfig
    from student_train.data import LabelStream, open_label_sets
    from student_train.runtime import build_model, make_optimizer
    from student_train.train import micro_step
    from student_train.vocab import load_tokenizer_for
    cfg_path = label_dir.parent / "student.json"
    cfg_path.write_text(json.dumps(STUDENT))
    cfg = TrainConfig(labels=(str(label_dir),), out="unused", student_config=str(cfg_path), loss=loss,
                      batch_size=batch_size, max_steps=steps)
    readers = open_label_sets([str(label_dir)])
    tok = load_tokenizer_for(None, readers[0].dir)
    model = build_model(None, str(cfg_path), tok, 0)
    opt, _ = make_optimizer(model, 1e-3, 0.1, 1, steps, 0.1)
    it = iter(LabelStream(readers, batch_size, k=64))
    times, positions = [], 0
    for i in range(steps + 2):
        batch, _ = next(it)
        t0 = time.perf_counter()
        micro_step({"student": model}, batch, cfg.ce_weight_at(i), lambda objective: objective.backward(), cfg=cfg)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:   # warm-up steps excluded
            times.append(time.perf_counter() - t0)
            positions += int(batch["mask"].sum())
    return sum(times) / len(times), positions / sum(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", help="a topk label set with k >= 64 (default: made from --teacher)")
    ap.add_argument("--teacher", help="make the labels with this teacher (a small one: 1.5 MB of text is scored)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--bucket", action="store_true", help="only the bucket-against-disk comparison (moto S3 server)")
    ap.add_argument("--student-tokenizer", help="also time the cross-tokenizer loader for this student tokenizer "
                                                 "(default: a byte-level BPE trained here on other text)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    if not (args.labels or args.teacher):
        ap.error("pass --labels DIR or --teacher DIR")
    labels = Path(args.labels) if args.labels else make_labels(args.teacher, work / "labels")
    m = json.loads((labels / "manifest.json").read_text())
    print(f"labels {labels}: {len(m['shards'])} shards, {m['counts']['rows']:,} rows, "
          f"{m['counts']['positions']:,} positions, k={m['k']}; torch threads {torch.get_num_threads()}\n")
    if args.bucket:
        bucket_report(labels, args.batch_size)
        return

    loader_rate(labels, args.batch_size, 0)   # warm the page cache: both timed runs read from memory
    rows0, pos0 = loader_rate(labels, args.batch_size, 0)
    rows_nc, pos_nc = loader_rate(labels, args.batch_size, 0, checksums=False)
    rows2, pos2 = loader_rate(labels, args.batch_size, 2)
    rows_x, pos_x, map_s = cross_loader_rate(labels, args.batch_size, args.student_tokenizer, work)
    ce_step, ce_pos = student_rate(labels, "ce", args.batch_size, args.steps)
    kd_step, kd_pos = student_rate(labels, "kd", args.batch_size, args.steps)
    print("| what | rows/s | positions/s |\n|---|---:|---:|")
    print(f"| loader, main process (footer hash + page CRC32 checked, the default) | {rows0:,.0f} | {pos0:,.0f} |")
    print(f"| loader, main process, checksums off | {rows_nc:,.0f} | {pos_nc:,.0f} |")
    print(f"| loader, 2 DataLoader workers | {rows2:,.0f} | {pos2:,.0f} |")
    print(f"| loader, main process, cross-tokenizer (student's own tokenizer; candidate map built once in "
          f"{map_s:.1f} s) | {rows_x:,.0f} | {pos_x:,.0f} |")
    print(f"| student step, CE only | {args.batch_size / ce_step:,.1f} | {ce_pos:,.0f} |")
    print(f"| student step, top-64 KD | {args.batch_size / kd_step:,.1f} | {kd_pos:,.0f} |")
    print(f"\nloader (main process) / student consumption (KD) = {pos0 / kd_pos:,.1f}x  (target >= 10x)")
    print(f"cross-tokenizer loader / student consumption (KD) = {pos_x / kd_pos:,.1f}x  (target >= 10x)")
    print(f"loader with checksums / without = {pos0 / pos_nc:.3f}")
    print(f"student step: CE {ce_step * 1000:.0f} ms, KD {kd_step * 1000:.0f} ms; KD/CE = {kd_step / ce_step:.2f}  (target <= 1.15)")

    big = replicate(labels, work / "x10", 10)
    rss1, rss10 = peak_rss_mb(labels), peak_rss_mb(big)
    print(f"\npeak RSS streaming {len(m['shards'])} shards: {rss1:,.0f} MB; {10 * len(m['shards'])} shards (10x): "
          f"{rss10:,.0f} MB; ratio {rss10 / rss1:.3f}  (target <= 1.10)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
