"""A teacher over two tensor-parallel ranks (--tp 2, gloo on CPU) labels as one
process does, and every run reports its FLOPs (MFU where the peak is known)."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import torchrun
from labelgen.cli import app
from labelgen.format import TAIL_SQRT_STEP, TARGET_LOGPROB_STEP, Encoding
from labelgen.generate import run
from labelgen.generate.config import GenerateConfig
from labelgen.shards import ShardReader

runner = CliRunner()


def rows(d):
    return sorted(ShardReader(d).rows(), key=lambda r: (r["example_id"], r["window_offset"]))


def args(teacher, corpus, out, *extra):
    return ["generate", "--teacher", teacher, "--input", str(corpus / "docs.jsonl"), "--out", str(out),
            "--max-seq-len", "64", "--batch-tokens", "256", "--rows-per-shard", "8", *extra]


def one_and_two(tiny_teacher, corpus, tmp_path, port, *extra):
    r = runner.invoke(app, args(tiny_teacher, corpus, tmp_path / "one", *extra, "--no-progress", "--device", "cpu"))
    assert r.exit_code == 0, r.output
    two = torchrun(port, "labelgen.cli", *args(tiny_teacher, corpus, tmp_path / "two", *extra, "--tp", "2"))
    assert two.stdout.count("wrote ") == 1   # the leader reports, the follower writes nothing
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["teacher"]["tensor_parallel"] == 2
    return rows(tmp_path / "one"), rows(tmp_path / "two")


@pytest.mark.slow
def test_two_tensor_parallel_ranks_give_the_top_k_labels_of_one_process(tiny_teacher, corpus, tmp_path):
    one, two = one_and_two(tiny_teacher, corpus, tmp_path, 29541, "--k", "16")
    assert [r["example_id"] for r in one] == [r["example_id"] for r in two]
    # The layers' all-reduce sums in another order (~1e-6 apart): entries tied that closely may trade places.
    ranks, swapped, enc = [], 0, Encoding()
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        # stored quantised: equal up to one step of their codes
        root = lambda c: np.sqrt(np.clip(1 - c.astype(np.float64), 0, 1))
        assert np.abs(root(a["coverage"]) - root(b["coverage"])).max() <= TAIL_SQRT_STEP + 1e-6
        assert np.abs(a["target_logprob"] - b["target_logprob"]).max() <= TARGET_LOGPROB_STEP + 1e-6
        for ia, la, ib, lb in zip(a["topk_ids"], a["topk_logprobs"], b["topk_ids"], b["topk_logprobs"]):
            pa, pb = dict(zip(ia.tolist(), la.tolist())), dict(zip(ib.tolist(), lb.tolist()))
            for i in pa.keys() & pb.keys():   # both quantised: within two steps of the codec
                assert enc.error(np.float32(pa[i]), np.float32(pb[i])) <= 2 * enc.max_error + 1e-6
            for i in pa.keys() - pb.keys():   # traded at the k-th place: tied with the last entry of both
                assert max(enc.error(np.float32(pa[i]), np.float32(min(lb))), enc.error(np.float32(pa[i]), np.float32(min(la)))) <= 2 * enc.max_error + 1e-6
            swapped += len(pa.keys() - pb.keys())
        ranks.append(np.abs(a["target_rank"].astype(int) - b["target_rank"]))
    ranks = np.concatenate(ranks)
    assert ranks.max() <= 2 and (ranks > 0).mean() < 0.01
    assert swapped <= 0.01 * len(ranks)


@pytest.mark.slow
def test_two_tensor_parallel_ranks_give_the_sampled_labels_of_one_process(tiny_teacher, corpus, tmp_path):
    one, two = one_and_two(tiny_teacher, corpus, tmp_path, 29542, "--mode", "sampled", "--draws", "12")
    same = total = 0
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        assert b["sampled_counts"].sum() == 12 * (len(b["input_ids"]) - 1)
        for ia, ca, ib, cb in zip(np.split(a["sampled_ids"], np.cumsum(a["sampled_lengths"])[:-1]),
                                  np.split(a["sampled_counts"], np.cumsum(a["sampled_lengths"])[:-1]),
                                  np.split(b["sampled_ids"], np.cumsum(b["sampled_lengths"])[:-1]),
                                  np.split(b["sampled_counts"], np.cumsum(b["sampled_lengths"])[:-1])):
            total += 1
            same += ia.tolist() == ib.tolist() and ca.tolist() == cb.tolist()
    # Same seeds, same streams: a draw moves only where the two teachers' probabilities (equal to ~1e-6) put
    # its uniform on the other side of a cumulative boundary.
    assert same / total > 0.99


def test_tensor_parallel_is_refused_where_it_cannot_run(tiny_teacher, corpus, tmp_path):
    r = runner.invoke(app, args(tiny_teacher, corpus, tmp_path / "x", "--tp", "2"))
    assert r.exit_code == 2 and "torchrun --nproc-per-node 2" in r.output and not (tmp_path / "x").exists()
    r = runner.invoke(app, args(tiny_teacher, corpus, tmp_path / "y", "--tp", "2", "--ray", "local"))
    assert r.exit_code == 2 and "--tp: not with --ray" in r.output and not (tmp_path / "y").exists()
    for setting, words in (({"backend": "vllm"}, "tensor_parallel_size=N"), ({"mode": "sample"}, "--tp: runs"),
                           ({"tp": 0}, "--tp: must be >= 1")):
        with pytest.raises(ValueError, match=words):
            GenerateConfig(teacher="t", inputs=("a",), out="o", **{"tp": 2, **setting})


def test_flops_per_token_follow_the_config_and_the_summary_names_the_mfu(tiny_teacher, corpus, tmp_path):
    from transformers import AutoConfig, LlamaConfig
    from labelgen.generate.mfu import FlopMeter, matmul_weights, peak_tflops
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 160           # q, k and v (2 kv heads), o, gated MLP
    assert matmul_weights(cfg) == 3 * per_layer + 64 * 1000
    tied = LlamaConfig(**{**cfg.to_dict(), "tie_word_embeddings": True})
    assert matmul_weights(tied) == matmul_weights(cfg)                   # the head multiplies, tied or not
    meter = FlopMeter.of(cfg, devices=2, peak_tflops_per_device=1.0)
    meter.add([10, 3])
    linear = 2 * matmul_weights(cfg)
    assert meter.flops == linear * 13 + 4 * 4 * 16 * 3 * (55 + 6)
    s = meter.summary(13, 2.0)
    assert s["mfu"] == pytest.approx(meter.flops / 2.0 / 2e12) and s["flops_per_token"] == meter.flops / 13
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989 and peak_tflops("NVIDIA H100 PCIe") == 756
    assert peak_tflops("NVIDIA H200") == 989 and peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert peak_tflops("NVIDIA B200") == 2250 and peak_tflops("Tesla T4") is None

    # CPU: tokens/s only, in the summary line and in run.json
    r = runner.invoke(app, args(tiny_teacher, corpus, tmp_path / "cpu", "--k", "8", "--no-progress", "--device", "cpu"))
    assert r.exit_code == 0 and "tok/s)" in r.output and "MFU" not in r.output
    summary = json.loads((tmp_path / "cpu" / "run.json").read_text())["summary"]
    assert summary["mfu"] is None and summary["teacher_tokens"] > 0
    expected = FlopMeter.of(AutoConfig.from_pretrained(tiny_teacher))
    assert expected.linear < summary["flops_per_token"] < expected.linear + expected.attention * 64
    # a peak given: the MFU is named
    m = run(GenerateConfig(teacher=tiny_teacher, inputs=(str(corpus / "docs.jsonl"),), out=str(tmp_path / "peak"),
                           k=8, max_seq_len=64, batch_tokens=256, progress=False, device="cpu", peak_tflops=0.5))
    s = m["summary"]
    assert s["mfu"] == pytest.approx(s["teacher_flops"] / s["seconds"] / 0.5e12, rel=0.05)
    assert json.loads((tmp_path / "peak" / "run.json").read_text())["summary"]["peak_tflops"] == 0.5
