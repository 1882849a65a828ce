"""Generation throughput, measured side by side in one run on one teacher.

    python benchmarks/bench_generate.py --teacher demo/teacher            # CPU: hf and vLLM
    python benchmarks/bench_generate.py --random-teacher qwen2.5-1.5b qwen2.5-7b --backends hf \
        --seq-len 4096 --batch-tokens 16384 --tokens 600000                 # GPU: Qwen2.5 shapes, bf16

Both rows are timed from start-up (model loading included; --warm: after
one warm-up batch), on the same windows; each row's MFU uses the FLOPs
labelgen reports (labelgen/mfu.py) over the GPU's dense bf16 peak.

Rows (tokens/s of teacher input, same windows for every row):
  (a) bare loop: HF forward + log_softmax + top-k, batches of the same windows
  (b) `labelgen generate --mode topk` end to end (read, tokenize, teacher, encode, write), per backend
  (c) vLLM prompt logprobs (k) called directly
  (d) sample mode: `labelgen generate --mode sample` vs a direct LLM.generate with the same requests
and the ratios the targets are stated in: (b hf)/(a) >= 0.90, (b vllm)/(c) >= 0.95, (d) >= 0.95.

    python benchmarks/bench_generate.py --teacher demo/teacher --bucket

instead writes the same label set to local disk and to an S3 API (moto's
server on localhost), three times each, alternating, and prints the
throughput ratio bucket / local (target >= 0.9: uploads overlap the teacher).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_corpus(path: Path, tokens_target: int, tokenizer) -> None:
    """JSONL of stdlib source, about tokens_target tokens."""
    from labelgen.tools.demo import read_corpus
    n = 0
    with open(path, "w") as f:
        for t in read_corpus(None, 64 << 20):
            f.write(json.dumps({"text": t}) + "\n")
            n += len(tokenizer(t)["input_ids"])
            if n >= tokens_target:
                return


# Random-init teachers of real shapes (nothing to download): Qwen2.5's configs, V = 151,936.
SHAPES = {
    "0.5b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=16),   # the 0.62B Llama of the first GPU figure
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4),
}


def random_teacher(out: Path, size: str) -> Path:
    """A randomly initialised bf16 teacher of a real shape (SHAPES), with the demo tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    from labelgen.tools.demo import DemoTeacherConfig, read_corpus, train_tokenizer
    qwen = size.startswith("qwen")
    cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if qwen else (LlamaConfig, LlamaForCausalLM)
    cfg = cls(vocab_size=151936, max_position_embeddings=32768 if qwen else 4096, tie_word_embeddings=False,
              **SHAPES[size])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = model_cls(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    del model
    train_tokenizer(read_corpus(None, 2 << 20), DemoTeacherConfig().vocab_size).save_pretrained(out)
    return out


def windows_of(corpus: Path, tokenizer, seq_len: int) -> list[np.ndarray]:
    from labelgen.generate.work import windows
    out = []
    for line in open(corpus):
        ids = np.asarray(tokenizer(json.loads(line)["text"])["input_ids"])
        if len(ids) >= 2:
            out += [w for _, w in windows(ids, seq_len, seq_len - 1)]
    return out


def bare_loop(teacher: str, wins: list[np.ndarray], k: int, batch_tokens: int, device: str,
              startup: bool = True) -> float:
    """(a): the simplest thing a person would write, batched the same way,
    timed from loading the model (startup) or after one warm-up batch."""
    from transformers import AutoModelForCausalLM
    from labelgen.generate.requests import topk_batches
    from labelgen.generate.config import GenerateConfig
    cfg = GenerateConfig(teacher=teacher, inputs=("x",), out="x", k=k, max_seq_len=max(len(w) for w in wins),
                         batch_tokens=batch_tokens)
    batches = list(topk_batches([("x", 0, w) for w in wins], cfg))
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=dtype).to(dev).eval()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    tokens, warm = 0, not startup
    with torch.inference_mode():
        for batch in ([batches[0]] if warm else []) + batches:   # a warm-up batch is not timed
            if warm and tokens:
                sync()
                tokens, t0, warm = 0, time.perf_counter(), False
            ws = [w for _, _, w in batch]
            T = max(len(w) for w in ws)
            ids = torch.zeros(len(ws), T, dtype=torch.long)
            mask = torch.zeros(len(ws), T, dtype=torch.long)
            for i, w in enumerate(ws):
                ids[i, : len(w)] = torch.as_tensor(w)
                mask[i, : len(w)] = 1
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
            top = torch.log_softmax(logits.float(), -1).topk(k, -1)
            top.values.cpu(), top.indices.cpu()
            tokens += sum(len(w) for w in ws)
    sync()
    return tokens / (time.perf_counter() - t0)


def pipeline(teacher: str, corpus: Path, out: Path, backend: str, k: int, seq_len: int, batch_tokens: int,
             mode: str = "topk", engine: dict | None = None, teacher_obj=None, **kw) -> float:
    """End to end through labelgen.generate.run, with an already loaded teacher if given."""
    from labelgen.generate.config import GenerateConfig
    from labelgen.generate import run
    cfg = GenerateConfig(teacher=teacher, inputs=(str(corpus),), out=str(out), backend=backend, k=k, mode=mode,
                         max_seq_len=seq_len, batch_tokens=batch_tokens, rows_per_shard=64, progress=False,
                         overwrite=True, engine=engine or {}, **kw)
    t0 = time.perf_counter()
    m = run(cfg, teacher=teacher_obj)
    return m["summary"]["teacher_tokens"] / (time.perf_counter() - t0)


def vllm_direct_topk(llm, wins: list[np.ndarray], k: int) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    params = SamplingParams(max_tokens=1, prompt_logprobs=k, flat_logprobs=True, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in w]) for w in wins]
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return sum(len(w) for w in wins) / (time.perf_counter() - t0)


def vllm_direct_sample(llm, prompts_ids: list[list[int]], n: int, max_new: int) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from labelgen.generate.requests import derive_seed
    reqs, params = [], []
    for i, ids in enumerate(prompts_ids):
        for j in range(n):
            reqs.append(TokensPrompt(prompt_token_ids=ids))
            params.append(SamplingParams(n=1, temperature=0.8, top_p=0.95, max_tokens=max_new,
                                         seed=derive_seed(0, str(i), j), logprobs=0, flat_logprobs=True, detokenize=False))
    t0 = time.perf_counter()
    outs = llm.generate(reqs, params, use_tqdm=False)
    tokens = sum(len(r["prompt_token_ids"]) for r in reqs) + sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens / (time.perf_counter() - t0)


def bucket_report(teacher: str, tok, corpus: Path, work: Path, wins, args) -> None:
    """The same run to local disk and to s3://bench/gen, alternating; median tokens/s of each."""
    from bench_loader import start_moto
    from labelgen.store import storage
    from labelgen.backends.hf import HFTeacher
    _, server = start_moto("bench")
    storage.filesystem.cache_clear()
    try:
        ht = HFTeacher(teacher, tok)
        ht.score(wins[: max(1, args.batch_tokens // args.seq_len)], args.k)
        rates = {"local": [], "bucket": []}
        for _ in range(3):
            for where, out in (("local", work / "local"), ("bucket", "s3://bench/gen")):
                rates[where].append(pipeline(teacher, corpus, out, "hf", args.k, args.seq_len, args.batch_tokens,
                                             teacher_obj=ht))
        ht.close()
        local, bucket = (sorted(v)[1] for v in rates.values())
        print("| --out | teacher tokens/s (median of 3) |\n|---|---:|")
        print(f"| local disk | {local:,.0f} |\n| S3 API on localhost (moto server) | {bucket:,.0f} |")
        print(f"bucket / local = {bucket / local:.2f}  (target >= 0.9)")
    finally:
        server.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="demo/teacher")
    ap.add_argument("--random-teacher", choices=sorted(SHAPES), nargs="+",
                    help="time random-init teachers of these shapes instead, one after another (GPU)")
    ap.add_argument("--backends", nargs="+", default=["hf", "vllm"])
    ap.add_argument("--tokens", type=int, default=60_000, help="corpus size in teacher tokens")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--warm", action="store_true", help="time both after loading and one warm-up batch (default: "
                    "from start-up, model loading included, as a job runs)")
    ap.add_argument("--bucket", action="store_true", help="only generation to a bucket against local disk (moto S3 server)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    if not args.random_teacher:
        return measure(args.teacher, work, args)
    for size in args.random_teacher:   # one teacher at a time: a 7B teacher's 15 GB leaves disk before the next
        import shutil
        measure(str(random_teacher(work / size, size)), work / f"{size}-runs", args, label=size)
        shutil.rmtree(work / size, ignore_errors=True)


def measure(teacher: str, work: Path, args, label: str | None = None) -> None:
    from transformers import AutoTokenizer
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(teacher)
    corpus = work / "corpus.jsonl"
    make_corpus(corpus, args.tokens, tok)
    wins = windows_of(corpus, tok, args.seq_len)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n_tokens = sum(len(w) for w in wins)
    print(f"teacher {label or teacher} on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; "
          f"{len(wins)} windows, {n_tokens:,} tokens; k={args.k}\n", flush=True)
    if args.bucket:
        return bucket_report(teacher, tok, corpus, work, wins, args)
    rows = {}
    bare = "(a) bare loop: HF forward + log_softmax + top-k"
    rows[bare] = bare_loop(teacher, wins, args.k, args.batch_tokens, device, startup=not args.warm)
    if "hf" in args.backends:
        ht = None
        if args.warm:   # loaded and warmed up on one batch, as the bare loop then is
            from labelgen.backends.hf import HFTeacher
            ht = HFTeacher(teacher, tok)
            ht.score(wins[: max(1, args.batch_tokens // args.seq_len)], args.k)
        rows["(b) labelgen generate --backend hf"] = pipeline(teacher, corpus, work / "hf", "hf", args.k, args.seq_len,
                                                             args.batch_tokens, teacher_obj=ht)
        if ht is not None:
            ht.close()
    if "vllm" in args.backends:
        vllm_rows(teacher, tok, corpus, work, wins, args, device, rows)
    # MFU of each row from the same FLOP count labelgen reports (labelgen/mfu.py), on the device's bf16 peak.
    from transformers import AutoConfig
    from labelgen.generate.mfu import FlopMeter, peak_tflops
    peak = peak_tflops(torch.cuda.get_device_name()) if device == "cuda" else None
    meter = FlopMeter.of(AutoConfig.from_pretrained(teacher), 1, peak)
    meter.add([len(w) for w in wins])
    per_token = meter.flops / n_tokens
    print("| run | tokens/s | MFU |\n|---|---:|---:|")
    for name, v in rows.items():
        mfu = f"{v * per_token / meter.peak:.1%}" if meter.peak else "-"
        print(f"| {name} | {v:,.0f} | {mfu} |")
    print(f"\n{per_token / 1e9:.2f} GFLOP per token; peak {'-' if not peak else f'{peak:,.0f} TFLOP/s bf16'}")
    a = rows[bare]
    if "(b) labelgen generate --backend hf" in rows:
        print(f"hf pipeline / bare loop = {rows['(b) labelgen generate --backend hf'] / a:.2f}  (target >= 0.90 on "
              "CPU, >= 0.95 on GPU)")
    if "(c) vLLM prompt logprobs, direct" in rows:
        print(f"vllm pipeline / direct vLLM = {rows['(b) labelgen generate --backend vllm'] / rows['(c) vLLM prompt logprobs, direct']:.2f}  (target >= 0.95)")
        print(f"sample pipeline / direct LLM.generate = {rows['(d) labelgen generate --mode sample --backend vllm, n=4'] / rows['(d) LLM.generate direct, n=4']:.2f}  (target >= 0.95)")
    print(flush=True)


def vllm_rows(teacher, tok, corpus, work, wins, args, device, rows) -> None:
    from labelgen.backends.vllm import VLLMTeacher
    engine = {"gpu_memory_utilization": 0.2} if device == "cpu" else {}
    vt = VLLMTeacher(teacher, tok, max_logprobs=args.k, engine={**engine, "max_model_len": 1024})
    vllm_direct_topk(vt.llm, wins[:16], args.k)   # warm-up (first-call compilation), not timed
    rows["(c) vLLM prompt logprobs, direct"] = vllm_direct_topk(vt.llm, wins, args.k)
    rows["(b) labelgen generate --backend vllm"] = pipeline(teacher, corpus, work / "vllm", "vllm", args.k,
                                                           args.seq_len, args.batch_tokens, teacher_obj=vt)
    prompts = [json.dumps({"prompt": json.loads(l)["text"][:200]}) for l in open(corpus)][: args.prompts]
    (work / "prompts.jsonl").write_text("\n".join(prompts) + "\n")
    p_ids = [tok(json.loads(p)["prompt"])["input_ids"] for p in prompts]
    rows["(d) LLM.generate direct, n=4"] = vllm_direct_sample(vt.llm, p_ids, 4, args.max_new_tokens)
    rows["(d) labelgen generate --mode sample --backend vllm, n=4"] = pipeline(
        teacher, work / "prompts.jsonl", work / "samples", "vllm", args.k, None, args.batch_tokens * 4,
        mode="sample", teacher_obj=vt, prompt_field="prompt", n=4, max_new_tokens=args.max_new_tokens)
    vt.close()


if __name__ == "__main__":
    main()
