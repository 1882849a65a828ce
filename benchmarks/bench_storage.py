"""Storage benchmark: bytes per position / per (id, logprob) entry and the
label error of each top-k encoding, measured side by side in one run.

    python benchmarks/bench_storage.py                     # synthetic, V = 32k and 152k
    python benchmarks/bench_storage.py --teacher DIR --corpus PATH   # + real labels from a teacher

Synthetic labels: every position gets a full-vocabulary distribution with a
Zipf-like prior over ids (low ids frequent, as in BPE vocabularies), per-
context noise and a peak, and keeps its exact top-k. Error is the mean
KL(exact top-k || decoded top-k), both renormalised over the k ids, in nats.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from labelgen.format import Encoding
from labelgen.shards import ShardReader, ShardWriter

ENCODINGS = {
    "rank, f32, plain ids (lossless)": Encoding(id_order="rank", logprob_codec="f32", id_encoding="plain"),
    "rank, u8": Encoding(id_order="rank", logprob_codec="u8"),
    "rank, gap 1/32, plain ids": Encoding(id_order="rank", logprob_codec="gap", id_encoding="plain"),
    "rank, gap 1/32, dict ids": Encoding(id_order="rank", logprob_codec="gap", id_encoding="dictionary"),
    "rank, gap 1/32": Encoding(id_order="rank", logprob_codec="gap"),
    "rank, gap 1/16": Encoding(id_order="rank", logprob_codec="gap", logprob_step=1 / 16),
    "sorted, f32": Encoding(id_order="sorted", logprob_codec="f32"),
    "sorted, u8 (default)": Encoding(),
    "sorted, u8, zstd 9": Encoding(zstd_level=9),
}


def synthetic_rows(vocab: int, k: int, positions: int, seq_len: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    prior = -1.1 * np.log1p(np.arange(vocab, dtype=np.float32))
    rows, done, chunk = [], 0, 256
    while done < positions:
        n = min(chunk, positions - done)
        logits = prior + rng.gumbel(size=(n, vocab)).astype(np.float32) * 1.5
        peaks = rng.zipf(1.3, size=(n, 3)) % vocab
        logits[np.arange(n)[:, None], peaks] += rng.uniform(2, 9, size=(n, 3)).astype(np.float32)
        lse = np.logaddexp.reduce(logits.astype(np.float64), axis=1, keepdims=True)
        part = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(logits, part, 1), axis=1, kind="stable")
        ids = np.take_along_axis(part, order, 1)
        lp = (np.take_along_axis(logits, ids, 1) - lse).astype(np.float32)
        for s in range(0, n, seq_len - 1):
            sl = slice(s, min(s + seq_len - 1, n))
            p = sl.stop - sl.start
            if p < 1:
                continue
            rows.append({"example_id": f"syn-{len(rows)}", "input_ids": np.r_[ids[sl, 0], ids[sl.stop - 1, 1]],
                         "topk_ids": ids[sl], "topk_logprobs": lp[sl],
                         "coverage": np.exp(lp[sl].astype(np.float64)).sum(1).astype(np.float32),
                         "target_logprob": lp[sl, 0], "target_rank": np.zeros(p, np.int64)})
        done += n
    return rows


def teacher_rows(teacher: str, corpus: list[str], k: int, positions: int) -> tuple[list[dict], int]:
    """Exact (f32) top-k labels from a real teacher over a real corpus."""
    from labelgen.backends.hf import HFTeacher
    from labelgen.demo import read_corpus
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(teacher)
    t = HFTeacher(teacher, tok)
    rows, n = [], 0
    for doc_i, text in enumerate(read_corpus(corpus, 8 << 20)):
        ids = np.asarray(tok(text)["input_ids"])
        for s in range(0, len(ids) - 1, 255):
            w = ids[s:s + 256]
            if len(w) < 2:
                continue
            (lab,) = t.score([w], k)
            rows.append({"example_id": f"doc{doc_i}-{s}", "input_ids": w, "topk_ids": lab.ids, "topk_logprobs": lab.logprobs,
                         "coverage": lab.coverage, "target_logprob": lab.target_logprob, "target_rank": lab.target_rank})
            n += len(w) - 1
            if n >= positions:
                return rows, t.logits_size
    return rows, t.logits_size


def kl_topk(exact: np.ndarray, decoded: np.ndarray) -> float:
    """Mean KL(p || q) between the renormalised exact and decoded top-k."""
    p = exact.astype(np.float64)
    q = decoded.astype(np.float64)
    p = p - np.logaddexp.reduce(p, axis=1, keepdims=True)
    q = q - np.logaddexp.reduce(q, axis=1, keepdims=True)
    return float((np.exp(p) * (p - q)).sum(1).mean())


def measure(rows: list[dict], k: int, vocab: int, enc: Encoding) -> dict:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with ShardWriter(Path(d) / "l", "topk", k, vocab, encoding=enc) as w:
            for r in rows:
                w.write(r)
        t_write = time.perf_counter() - t0
        m = w.manifest
        t0 = time.perf_counter()
        decoded = [r["topk_logprobs"] for r in ShardReader(Path(d) / "l").rows(columns=["topk_logprobs"])]
        t_read = time.perf_counter() - t0
    exact = np.concatenate([r["topk_logprobs"] for r in rows])
    pos = m["counts"]["positions"]
    b = sum(s["bytes"] for s in m["shards"])
    return {"bytes_per_position": b / pos, "bytes_per_entry": b / (pos * k),
            "kl": kl_topk(exact, np.concatenate(decoded)), "write_pos_s": pos / t_write, "read_pos_s": pos / t_read}


def report(title: str, rows: list[dict], k: int, vocab: int):
    print(f"\n### {title}: V={vocab:,}, k={k}, {sum(len(r['coverage']) for r in rows):,} positions")
    print(f"| encoding | B/position | B/entry | mean KL (nats) | write pos/s | read pos/s |")
    print(f"|---|---:|---:|---:|---:|---:|")
    for name, enc in ENCODINGS.items():
        r = measure(rows, k, vocab, enc)
        print(f"| {name} | {r['bytes_per_position']:.1f} | {r['bytes_per_entry']:.3f} | {r['kl']:.2e} | "
              f"{r['write_pos_s']:,.0f} | {r['read_pos_s']:,.0f} |")
        sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=8192)
    ap.add_argument("--ks", type=int, nargs="+", default=[8, 32, 64, 128])
    ap.add_argument("--vocabs", type=int, nargs="+", default=[32_000, 152_064])
    ap.add_argument("--teacher", help="also measure real labels from this teacher directory")
    ap.add_argument("--corpus", nargs="*", help="text for --teacher (default: Python's stdlib source)")
    args = ap.parse_args()
    for vocab in args.vocabs:
        for k in args.ks:
            report("synthetic (Zipf ids, peaked)", synthetic_rows(vocab, k, args.positions, 512), k, vocab)
    if args.teacher:
        for k in args.ks:
            rows, vocab = teacher_rows(args.teacher, args.corpus, k, args.positions)
            report(f"real teacher {args.teacher}", rows, k, vocab)


if __name__ == "__main__":
    main()
