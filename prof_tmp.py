import sys, time, json, torch, numpy as np
sys.path.insert(0, "benchmarks")
from pathlib import Path
import tempfile
from bench_generate import random_teacher, make_corpus, windows_of
from transformers import AutoTokenizer
from labelgen.backends.hf import HFTeacher
from labelgen.generate import GenerateConfig, _topk_batches, _score
from labelgen import format as fmt
from labelgen.format import Encoding
work = Path(tempfile.mkdtemp())
teacher = str(random_teacher(work / "t", "0.5b"))
tok = AutoTokenizer.from_pretrained(teacher)
make_corpus(work / "c.jsonl", 600000, tok)
wins = windows_of(work / "c.jsonl", tok, 1024)
cfg = GenerateConfig(teacher=teacher, inputs=("x",), out="x", k=64, max_seq_len=1024, batch_tokens=16384)
batches = list(_topk_batches([("x", 0, w) for w in wins], cfg))
for variant in ("compiled+blocked", "eager"):
    t = HFTeacher(teacher, tok)
    if variant == "eager":
        t._row_stats = __import__("labelgen.backends.hf", fromlist=["x"])._row_stats
        t._topk = lambda l, k: l.topk(k, dim=-1)
    t.score([w for _, _, w in batches[0]], 64)
    torch.cuda.synchronize(); t0 = time.perf_counter(); n = 0; rows_all = []
    for b in batches:
        rows, ntok = _score(t, b, cfg); n += ntok; rows_all.append(rows)
    torch.cuda.synchronize(); dt = time.perf_counter() - t0
    print(f"score only ({variant}): {n / dt:,.0f} tok/s")
for enc in (Encoding(), Encoding(id_order="rank", logprob_codec="gap"), Encoding(id_order="rank", logprob_codec="f32")):
    t0 = time.perf_counter(); pos = 0
    from labelgen.shards import ShardFile
    f = ShardFile(work / f"s{enc.id_order}{enc.logprob_codec}.parquet", "topk", 64, 151936, enc)
    for rows in rows_all[:20]:
        for r in rows:
            f.write(r)
            pos += len(r["coverage"])
    f.close()
    t1 = time.perf_counter()
    for rows in rows_all[:20]:
        fmt.encode_topk_rows(rows, 64, 151936, enc)
    t2 = time.perf_counter()
    print(f"write {enc.id_order}/{enc.logprob_codec}: {pos / (t1 - t0):,.0f} pos/s incl. zstd; encode only {pos / (t2 - t1):,.0f} pos/s")
