"""The student's LM head chunk by chunk (student_train/head.py) against the
model's full [batch, positions, V] logits (--head-chunk-mb 0, the path
before it), side by side in one run: peak memory (CPU: the process's peak
RSS; GPU: max_memory_allocated) and optimizer-step time per loss, at real
vocabularies. Each cell runs in a process of its own, so one cell's peak is
not another's. The student is a random-init Llama of the given shape (no
download); labels are synthetic with the shapes real ones have (top-64 with
coverage 0.9, N = 12 distinct sampled ids), ids below the tokenizer's
width (the config's vocabulary is padded by 271 slots, as Qwen2.5's).

    python benchmarks/bench_head.py                       # V = 151,936 and 49,152, 2 x 4,096, width 96, 2 layers
    python benchmarks/bench_head.py --device cuda --width 896 --layers 24 --heads 14 --kv-heads 2 \\
        --intermediate 4864 --batch 8 --vocab 151936 --tied     # a Qwen2.5-0.5B-shaped student on one GPU
    python benchmarks/bench_head.py --chunks 16 64 256    # step time of chunk sizes (MiB), chunked path only
    python benchmarks/bench_head.py --variant recompute   # beside the gradient recomputed per chunk in backward
    python benchmarks/bench_head.py --cli /tmp/head-e2e   # `student-train train` itself, on labels of a V = 151,936 teacher
    python benchmarks/bench_head.py --labels smollm2-labels/ --batch 2   # a real label set's first rows

--cli WORK: end to end through the command line, on real label sets (cached
in WORK): a 2-layer teacher of width 128 with V = 151,936, trained briefly
on Python source, a byte-level BPE of 4,096 tokens padded with unused ones
to Qwen2.5's 151,665 (the config's vocabulary is wider than the
tokenizer's), windows of 4,096 tokens labelled top-64 and sampled (12
draws). Each loss is one `student-train train` process of a 2-layer
student of width 96 at batch 2 x 4,096, measured by its own peak RSS
(imports included); then 30 steps of top-64 KD with the held-out KL before
and after.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

LOSSES = {   # name -> (TrainConfig settings, labels)
    "CE": (dict(loss="ce"), "topk"),
    "top-64 KD (tail)": (dict(loss="kd", tail="tail"), "topk"),
    "top-64 KD (target)": (dict(loss="kd", tail="target"), "topk"),
    "sampled KD (N=12)": (dict(loss="kd"), "sampled"),
}
PADDING = 271   # Qwen2.5: config vocab 151,936, tokenizer 151,665


def labels(kind: str, B: int, T: int, V: int, k: int, device) -> dict:
    """Synthetic labels [B, T-1, ...] of the real shapes, made without a [B, T, V] tensor."""
    import torch
    g = torch.Generator().manual_seed(0)
    tokens = V - PADDING
    ids = torch.randint(0, tokens, (B, T), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "targets": ids[:, 1:].clone(),
           "mask": torch.ones(B, T - 1, dtype=torch.bool)}
    width = k if kind == "topk" else 12
    start = torch.randint(0, tokens, (B, T - 1, 1), generator=g)
    distinct = (start + torch.arange(width) * 977) % tokens
    if kind == "topk":
        lp = torch.log_softmax(torch.randn(B, T - 1, width, generator=g) * 2, -1) + torch.log(torch.tensor(0.9))
        out.update(topk_ids=distinct, topk_logprobs=lp, coverage=lp.exp().sum(-1))
    else:
        out.update(sampled_ids=distinct, sampled_weights=torch.full(distinct.shape, 1 / width))
    return {name: v.to(device) for name, v in out.items()}


def real_labels(where: str, rows: int, device) -> dict:
    """The first `rows` rows of a label set, as the training loader batches them."""
    from student_train.data import LabelStream, open_label_sets
    batch, _ = next(iter(LabelStream(open_label_sets([where]), rows, shuffle=False, k=64)))
    return {name: v.to(device) for name, v in batch.items()}


def recompute_in_backward():
    """The other design head.py could have taken: the forward pass computes the
    losses only, and backward makes each chunk's logits again to take their
    gradient (one more head matmul and loss pass per chunk, nothing held
    between the passes but the hidden states). Swapped in by --variant recompute."""
    import torch

    class Recompute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, terms, rows, chunk, grads, totals):
            for start in range(0, hidden.shape[0], chunk):
                out = terms((hidden[start:start + chunk] @ weight.T).float(),
                            {k: v[start:start + chunk] for k, v in rows.items()})
                for name, v in out.items():
                    totals[name] = totals.get(name, 0) + v.detach()
            ctx.save_for_backward(hidden, weight)
            ctx.terms, ctx.rows, ctx.chunk = terms, rows, chunk
            return totals["objective"].clone()

        @staticmethod
        def backward(ctx, grad):
            hidden, weight = ctx.saved_tensors
            dh, dw = torch.empty_like(hidden), torch.zeros_like(weight)
            for start in range(0, hidden.shape[0], ctx.chunk):
                h = hidden[start:start + ctx.chunk]
                with torch.enable_grad():
                    z = (h @ weight.T).float().requires_grad_(True)
                    out = ctx.terms(z, {k: v[start:start + ctx.chunk] for k, v in ctx.rows.items()})
                    g = torch.autograd.grad(out["objective"], z)[0] * grad
                dh[start:start + ctx.chunk] = g @ weight
                dw.addmm_(g.T, h)
            return dh, dw, None, None, None, None, None, None
    return Recompute


def one(args) -> dict:
    """One cell: build the student, take 1 + args.steps optimizer steps, report peak memory and step time."""
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from student_train.config import TrainConfig
    from student_train.objective import loss_step
    torch.manual_seed(0)
    if args.variant == "recompute":
        from student_train import head
        head._ChunkedHead = recompute_in_backward()
    device = torch.device(args.device)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, tie_word_embeddings=args.tied,
                         max_position_embeddings=max(args.seq, 2048))
    model = LlamaForCausalLM(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    settings, kind = LOSSES[args.one]
    cfg = TrainConfig(labels=("synthetic",), out="unused", student="unused", head_chunk_mb=args.chunk_mb, **settings)
    batch = labels(kind, args.batch, args.seq, args.vocab, 64, device) if args.labels is None else \
        real_labels(args.labels, args.batch, device)
    cuda = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    times = []
    for step in range(1 + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with amp:
            out = loss_step(model, batch, cfg, alpha=cfg.ce_weight_at(0))
        out["objective"].backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_gib": peak / 2**30, "step_s": statistics.median(times), "loss": float(out["objective"])}


def cell(args, loss: str, vocab: int, chunk_mb: int | None, variant: str = "forward") -> dict:
    cmd = [sys.executable, __file__, "--one", loss, "--vocab", str(vocab), *(["--chunk-mb", str(chunk_mb)] * (chunk_mb is not None)),
           "--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq), "--width", str(args.width),
           "--layers", str(args.layers), "--heads", str(args.heads), "--kv-heads", str(args.kv_heads),
           "--intermediate", str(args.intermediate), "--steps", str(args.steps), "--variant", variant] + \
        (["--tied"] if args.tied else []) + (["--labels", args.labels] if args.labels else [])
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["killed"])[-1]
        return {"error": "out of memory" if "out of memory" in p.stderr.lower() or p.returncode < 0 else tail}
    return json.loads(p.stdout.strip().splitlines()[-1])


TEACHER_STEPS = 150
E2E_RUNS = {   # name -> (labels, student-train flags)
    "CE": ("topk", ["--loss", "ce"]),
    "top-64 KD (tail)": ("topk", ["--loss", "kd", "--tail", "tail"]),
    "top-64 KD (target)": ("topk", ["--loss", "kd", "--tail", "target"]),
    "sampled KD (N=12)": ("sampled", ["--loss", "kd"]),
}


def padded_vocabulary(tok, size: int):
    """`tok` with unused entries appended to its BPE vocabulary up to `size`
    tokens: a tokenizer as large as a real one (as added tokens they would
    cost far more memory than a real vocabulary of that size does)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<unused_{i}>": len(vocab) + i for i in range(size - len(tok))})
    padded = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=tok.bos_token,
                                     eos_token=tok.eos_token, pad_token=tok.pad_token)
    padded.chat_template = tok.chat_template
    return padded


def build_labels(work: Path, vocab: int, seq: int) -> dict:
    """The teacher, its tokenizer and its topk / sampled label sets under `work` (made once)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from labelgen.tools.demo import read_corpus, token_stream, train_tokenizer
    teacher = work / "teacher"
    texts = read_corpus(None, 600_000)
    if not (work / "docs.jsonl").is_file():
        tok = padded_vocabulary(train_tokenizer(texts, 4096), vocab - PADDING)
        stream = torch.from_numpy(token_stream(texts, tok))
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=320,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                             max_position_embeddings=seq, bos_token_id=0, eos_token_id=1,
                                             pad_token_id=2))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(TEACHER_STEPS):
            starts = torch.randint(0, len(stream) - 129, (8,), generator=g).tolist()
            batch = torch.stack([stream[s:s + 128] for s in starts])
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.save_pretrained(teacher)
        tok.save_pretrained(teacher)
        joined = "\n".join(texts)   # 3 long records: windows of the full length, 3 shards (one held out)
        third = len(joined) // 3 + 1
        with open(work / "docs.jsonl", "w") as f:
            f.writelines(json.dumps({"text": joined[i:i + third]}) + "\n" for i in range(0, len(joined), third))
    sets = {}
    for kind, extra in (("topk", ["--k", "64"]), ("sampled", ["--draws", "12"])):
        sets[kind] = work / kind
        if not (sets[kind] / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "labelgen.cli", "generate", "--teacher", str(teacher),
                            "--input", str(work / "docs.jsonl"), "--out", str(sets[kind]), "--mode", kind, *extra,
                            "--max-seq-len", str(seq), "--batch-tokens", str(2 * seq), "--rows-per-shard", "1",
                            "--overwrite", "--no-progress"], check=True)
    return sets


def cli_one(argv: list[str]) -> None:
    """`student-train ARGV` in this process; prints its peak RSS (GiB) last."""
    import resource

    from student_train.cli import app
    try:
        app(argv, standalone_mode=False)
    finally:
        print(json.dumps({"peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def end_to_end(args) -> None:
    work = Path(args.cli)
    work.mkdir(parents=True, exist_ok=True)
    vocab = args.vocab[0]
    sets = build_labels(work, vocab, args.seq)
    student = work / "student.json"
    student.write_text(json.dumps({"model_type": "llama", "vocab_size": vocab, "hidden_size": args.width,
                                   "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
                                   "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
                                   "max_position_embeddings": args.seq, "tie_word_embeddings": args.tied}))
    print(f"student-train train: Llama student, {args.layers} layers, width {args.width}, V = {vocab:,} "
          f"(tokenizer {vocab - PADDING:,}), batch {args.batch} x {args.seq}; peak RSS of the process (GiB)")

    def train(name: str, labels: str, flags: list[str], *extra: str) -> tuple[dict, list[dict]]:
        out = work / "runs" / name.replace(" ", "_")
        cmd = [sys.executable, __file__, "--cli-one", "train", "--labels", str(sets[labels]),
               "--student-config", str(student), "--out", str(out), "--batch-size", str(args.batch),
               "--device", args.device, "--overwrite", "--no-progress", "--warmup-steps", "0",
               *(["--head-chunk-mb", str(args.chunk_mb)] * (args.chunk_mb is not None)), *flags, *extra]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if p.returncode != 0:
            raise SystemExit(f"{name}: {p.stderr.strip()[-2000:]}")
        seconds = time.perf_counter() - t0
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return {**json.loads(p.stdout.strip().splitlines()[-1]), "seconds": seconds}, lines

    for name, (labels, flags) in E2E_RUNS.items():
        r, _ = train(name, labels, flags, "--max-steps", "1", "--eval-every", "0")
        print(f"{name:<20} one optimizer step: peak RSS {r['peak_gib']:.2f} GiB ({r['seconds']:.0f} s, start-up included)",
              flush=True)
    r, lines = train("30 steps", "topk", ["--loss", "kd", "--tail", "tail"], "--max-steps", "30", "--eval-holdout", "1",
                     "--eval-every", "30", "--eval-batches", "4", "--lr", "3e-3")
    evals = [x for x in lines if "eval_kl" in x]
    print(f"top-64 KD (tail), 30 steps: held-out KL {evals[0]['eval_kl']:.3f} -> {evals[-1]['eval_kl']:.3f}, "
          f"CE {evals[0]['eval_ce']:.3f} -> {evals[-1]['eval_ce']:.3f}; peak RSS {r['peak_gib']:.2f} GiB "
          f"({r['seconds']:.0f} s)")


def main() -> None:
    if sys.argv[1:2] == ["--cli-one"]:
        return cli_one(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[151936, 49152])
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--tied", action="store_true", help="tie the head to the embeddings")
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps per cell, after one untimed")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk-mb", type=int, default=None, help="the chunked path's MiB per chunk (default: head.CHUNK_MB)")
    ap.add_argument("--chunks", type=int, nargs="+", help="compare these chunk sizes (MiB) instead of the old path")
    ap.add_argument("--variant", choices=["forward", "recompute"], default="forward",
                    help="recompute: add a column where backward makes each chunk's logits again (head.py's alternative)")
    ap.add_argument("--labels", help="a real topk (or sampled) label set instead of synthetic labels: its tokenizer's "
                                     "width is V, its first --batch rows the batch")
    ap.add_argument("--cli", metavar="WORK", help="end to end through `student-train train` (see above)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cli:
        args.vocab = args.vocab[:1]
        return end_to_end(args)
    if args.labels:
        from student_train.data import open_label_sets
        reader = open_label_sets([args.labels])[0]
        args.vocab = [reader.manifest["tokenizer"]["vocab_size"]]
        args.losses = [name for name in args.losses if LOSSES[name][1] == ("sampled" if reader.kind == "sampled" else "topk")]
        print(f"labels: {args.labels} ({reader.kind}, teacher {reader.manifest.get('config', {}).get('teacher')})")
    if args.one:
        args.vocab = args.vocab[0]
        print(json.dumps(one(args)))
        return
    columns = [(f"{mb} MiB", mb, "forward") for mb in args.chunks] if args.chunks else \
        [("old", 0, "forward"), ("recompute", args.chunk_mb, "recompute"), ("chunked", args.chunk_mb, "forward")] \
        if args.variant == "recompute" else [("old", 0, "forward"), ("chunked", args.chunk_mb, "forward")]
    memory = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"student: Llama, {args.layers} layers, width {args.width}, {'tied' if args.tied else 'untied'} head; "
          f"batch {args.batch} x {args.seq} positions; {args.device}; {memory} (GiB) and seconds per optimizer step")
    for vocab in args.vocab:
        for loss in args.losses:
            results = [(name, cell(args, loss, vocab, mb, variant)) for name, mb, variant in columns]
            shown = []
            for name, r in results:
                shown.append(f"{name}: {r['error']}" if "error" in r else
                             f"{name}: {r['peak_gib']:.2f} GiB {r['step_s']:.2f} s")
            first, last = results[0][1], results[-1][1]
            if "error" not in first and "error" not in last:
                shown.append(f"memory {last['peak_gib'] / first['peak_gib']:.2f}x, time {last['step_s'] / first['step_s']:.2f}x, "
                             f"loss {first['loss']:.5f} vs {last['loss']:.5f}")
            print(f"V={vocab:>7,} {loss:<20} " + " | ".join(shown), flush=True)


if __name__ == "__main__":
    main()
