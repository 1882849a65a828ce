"""Sampled soft labels (Anshumann et al. 2025): N teacher draws per position."""

import json
import math

import numpy as np
import pytest
import torch

from helpers import assert_stored_coverage
from labelgen.backends.hf import _distinct
from labelgen.errors import FormatError
from labelgen.generate import run
from labelgen.generate.config import GenerateConfig
from labelgen.shards import ShardReader
from labelgen.tools.inspection import inspect, validate
from student_train.data import collate, columns_from_rows
from student_train.losses import full_kd, sampled_kd, topk_kd


def grad_of(loss_fn, logits):
    s = logits.clone().requires_grad_(True)
    loss_fn(s).backward()
    return s.grad.flatten()


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def sampled_batch(p_teacher, n, seed, temperature=1.0):
    """Draw like the hf backend, store like the writer, load like the trainer."""
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(torch.log(p_teacher) / temperature, -1)
    drawn = torch.multinomial(q, n, replacement=True, generator=g)
    s = _distinct([(drawn, torch.log(p_teacher).gather(1, drawn))])
    row = {"input_ids": np.zeros(len(p_teacher) + 1, np.int64), "sampled_ids": s.ids, "sampled_counts": s.counts,
           "sampled_lengths": s.lengths, "sampled_logprobs": s.logprobs if temperature != 1.0 else s.logprobs[:0]}
    return collate(columns_from_rows([row]), "sampled", proposal_temperature=temperature)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mean_sampled_gradient_converges_to_the_full_kd_gradient_and_topk_does_not(temperature):
    torch.manual_seed(0)
    P, V = 6, 40
    p = torch.softmax(torch.randn(P, V) * 2.0, -1)                   # a peaked teacher with a real tail
    student = torch.randn(1, P, V)
    mask = torch.ones(1, P, dtype=torch.bool)
    full = grad_of(lambda s: full_kd(s, torch.log(p)[None], mask), student)
    mean = sum(grad_of(lambda s: sampled_kd(s, b["sampled_ids"], b["sampled_weights"], mask), student)
               for b in (sampled_batch(p, 50, seed, temperature) for seed in range(300))) / 300
    top = torch.log(p).topk(3, -1)
    topk = grad_of(lambda s: topk_kd(s, top.indices[None], top.values[None], top.values.exp().sum(-1)[None], mask,
                                     tail="renorm"), student)
    assert cosine(mean, full) > 0.99
    assert cosine(topk, full) < 0.9


def test_sampled_labels_reproduce_per_window_and_round_trip(tiny_teacher, corpus, tmp_path):
    common = dict(teacher=tiny_teacher, inputs=(str(corpus / "docs.jsonl"),), mode="sampled", draws=50, max_seq_len=64,
                  rows_per_shard=6, progress=False, device="cpu", id_field="id")
    run(GenerateConfig(out=str(tmp_path / "a"), batch_tokens=512, **common))
    run(GenerateConfig(out=str(tmp_path / "b"), batch_tokens=64, **common))   # other batches, same windows
    assert validate(tmp_path / "a")["ok"]

    def rows(d):
        return sorted(ShardReader(d).rows(), key=lambda r: (r["example_id"], r["window_offset"]))
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert len(a) == len(b) > 20
    for x, y in zip(a, b):
        for key in ("sampled_ids", "sampled_counts", "sampled_lengths", "input_ids"):
            np.testing.assert_array_equal(x[key], y[key])
        starts = np.concatenate([[0], np.cumsum(x["sampled_lengths"])[:-1]])
        assert (np.add.reduceat(x["sampled_counts"], starts) == 50).all()
        assert len(x["sampled_lengths"]) == len(x["input_ids"]) - 1
    run(GenerateConfig(out=str(tmp_path / "c"), batch_tokens=512, seed=1, **common))
    assert any(not np.array_equal(x["sampled_ids"], y["sampled_ids"]) for x, y in zip(a, rows(tmp_path / "c")))
    r = inspect(tmp_path / "a")
    assert 1 <= r["unique_per_position"] <= 50 and r["draws"] == 50
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["sampling"]["draws"] == 50


def test_a_tempered_proposal_stores_logprobs_for_the_correction(tiny_teacher, corpus, tmp_path):
    run(GenerateConfig(teacher=tiny_teacher, inputs=(str(corpus / "docs.jsonl"),), out=str(tmp_path / "t"),
                       mode="sampled", draws=20, proposal_temperature=2.0, max_seq_len=64, progress=False, device="cpu"))
    row = next(iter(ShardReader(tmp_path / "t").rows()))
    assert len(row["sampled_logprobs"]) == len(row["sampled_ids"]) and (row["sampled_logprobs"] <= 0).all()


def test_the_vllm_backend_points_to_hf_for_sampled_labels():
    from labelgen.backends.vllm import VLLMTeacher
    with pytest.raises(ValueError, match="--mode sampled needs --backend hf"):
        VLLMTeacher.draw(None, [np.arange(3)], 50, 1.0, [0])


def test_training_on_sampled_labels_lowers_the_kl_to_the_teacher(tiny_teacher, corpus, student_config, topk_labels,
                                                                tmp_path):
    from student_train.config import TrainConfig
    from student_train.train import train
    run(GenerateConfig(teacher=tiny_teacher, inputs=(str(corpus / "docs.jsonl"),), out=str(tmp_path / "s"),
                       mode="sampled", draws=50, max_seq_len=64, rows_per_shard=4, progress=False, device="cpu"))
    train(TrainConfig(labels=(str(tmp_path / "s"),), eval_labels=(str(topk_labels),), student_config=student_config,
                      out=str(tmp_path / "run"), loss="kd", max_steps=40, batch_size=4, lr=5e-3, warmup_steps=2,
                      eval_every=40, eval_batches=4, save_every=0, progress=False, device="cpu"))
    m = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert m[-1]["eval_kl"] < 0.5 * m[0]["eval_kl"]


def test_the_sampled_tail_loss_is_the_hand_computed_bucket_kl():
    """Drawn ids {2, 5, 7} with counts 3, 1, 1 of N = 5, the teacher's exact mass on them 0.6: buckets
    0.6 x (3/5, 1/5, 1/5) and the rest 0.4, against the student's q_2, q_5, q_7 and 1 - their sum."""
    from student_train.losses import sampled_tail_terms
    torch.manual_seed(0)
    z = torch.randn(1, 1, 10, requires_grad=True)
    ids = torch.tensor([[[2, 5, 7, 0]]])                            # a 4th, empty slot
    weights = torch.tensor([[[0.6, 0.2, 0.2, 0.0]]])
    coverage = torch.tensor([[0.6]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss = sampled_tail_terms(z, ids, weights, coverage, mask)[0, 0]
    q = torch.softmax(z[0, 0].detach().double(), -1)
    p = [0.36, 0.12, 0.12]
    qs = [q[2], q[5], q[7]]
    rest = 1 - sum(qs)
    hand = sum(pi * math.log(pi / qi) for pi, qi in zip(p, qs)) + 0.4 * torch.log(0.4 / rest)
    assert abs(float(loss) - float(hand)) < 1e-5
    loss.backward()
    g = z.grad[0, 0].double()
    drawn = torch.tensor([2, 5, 7])
    np.testing.assert_allclose(g[drawn], q[drawn] - torch.tensor(p, dtype=torch.double), atol=1e-6)
    never = torch.tensor([0, 1, 3, 4, 6, 8, 9])                  # full KD's aggregate push: q_j (1 - p_rest / q_rest)
    np.testing.assert_allclose(g[never], q[never] * (1 - 0.4 / rest), atol=1e-6)

    # with the drawn ids' exact logprobs stored: the mass on the drawn ids is shared by them, not by the counts
    lp = torch.log(torch.tensor([[[0.30, 0.20, 0.10, 1.0]]]))
    loss = sampled_tail_terms(z.detach(), ids, weights, coverage, mask, logprobs=lp)[0, 0]
    p = [0.6 * 0.5, 0.6 * 2 / 6, 0.6 / 6]
    hand = sum(pi * math.log(pi / qi) for pi, qi in zip(p, qs)) + 0.4 * torch.log(0.4 / rest)
    assert abs(float(loss) - float(hand)) < 1e-5


def test_sampled_sets_record_the_mass_on_the_drawn_ids_and_train_with_a_tail_bucket(tiny_teacher, corpus, tmp_path,
                                                                                     student_config, topk_labels):
    from transformers import AutoModelForCausalLM
    from student_train.config import TrainConfig
    from student_train.train import train
    run(GenerateConfig(teacher=tiny_teacher, inputs=(str(corpus / "docs.jsonl"),), out=str(tmp_path / "s"),
                       mode="sampled", draws=12, max_seq_len=64, rows_per_shard=8, progress=False, device="cpu",
                       draw_logprobs=True, encoding={"sampled_coverage": True}))
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["format_version"] >= "2.2" and m["encoding"]["sampled_coverage"]
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    for row in list(ShardReader(tmp_path / "s").rows())[:3]:
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.as_tensor(row["input_ids"])[None]).logits[0, :-1].float(), -1)
        starts = np.concatenate([[0], np.cumsum(row["sampled_lengths"])[:-1]])
        position = np.repeat(np.arange(len(starts)), row["sampled_lengths"])
        exact = lp[position, row["sampled_ids"]].numpy()
        np.testing.assert_allclose(row["sampled_logprobs"], exact, atol=20 / 510 + 1e-4)       # the u8 codec's bound
        mass = np.add.reduceat(np.exp(exact.astype(np.float64)), starts)
        assert_stored_coverage(row["coverage"], mass)
    common = dict(eval_labels=(str(topk_labels),), student_config=student_config, loss="kd", max_steps=30, batch_size=4,
                  lr=5e-3, warmup_steps=2, eval_every=30, eval_batches=4, save_every=0, progress=False, device="cpu")
    train(TrainConfig(labels=(str(tmp_path / "s"),), out=str(tmp_path / "tail"), tail="tail", **common))
    metrics = [json.loads(line) for line in open(tmp_path / "tail" / "metrics.jsonl")]
    assert metrics[-1]["eval_kl"] < 0.6 * metrics[0]["eval_kl"]
    with pytest.raises(FormatError, match="sampled labels take --tail tail"):
        train(TrainConfig(labels=(str(tmp_path / "s"),), out=str(tmp_path / "renorm"), tail="renorm", **common))


def test_a_sampled_set_written_before_format_2_2_still_trains_and_refuses_the_tail_bucket(tiny_teacher, corpus,
                                                                                          tmp_path, student_config,
                                                                                          topk_labels):
    """A 2.1 writer stored no coverage column and no sampled_coverage key: the estimator trains on it as before."""
    import pyarrow.parquet as pq
    from student_train.config import TrainConfig
    from student_train.train import train
    old = tmp_path / "old"
    run(GenerateConfig(teacher=tiny_teacher, inputs=(str(corpus / "docs.jsonl"),), out=str(old), mode="sampled",
                       draws=12, max_seq_len=64, rows_per_shard=8, progress=False, device="cpu",
                       encoding={"sampled_coverage": False}))
    # What a 2.1 writer put in the manifest (its shards' columns are these shards' columns).
    m = json.loads((old / "manifest.json").read_text())
    m["format_version"] = "2.1"
    del m["encoding"]["sampled_coverage"]
    for s in m["shards"]:
        assert "coverage" not in pq.ParquetFile(old / s["name"]).schema_arrow.names
    (old / "manifest.json").write_text(json.dumps(m))
    assert validate(old)["ok"]
    common = dict(eval_labels=(str(topk_labels),), student_config=student_config, loss="kd", max_steps=2, batch_size=4,
                  warmup_steps=1, eval_every=2, eval_batches=2, save_every=0, progress=False, device="cpu")
    train(TrainConfig(labels=(str(old),), out=str(tmp_path / "estimator"), **common))
    assert np.isfinite(json.loads(open(tmp_path / "estimator" / "metrics.jsonl").readlines()[-1])["eval_kl"])
    with pytest.raises(FormatError, match="without the teacher's mass on the drawn ids"):
        train(TrainConfig(labels=(str(old),), out=str(tmp_path / "tail"), tail="tail", **common))
