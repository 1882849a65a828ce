"""The chunked LM head (student_train/head.py) gives the losses, metrics and
gradients of the model's full logits (--head-chunk-mb 0, the path before it)
for every loss, without a tensor of every position's logits."""

import functools

import pytest
import torch

from student_train import head
from student_train.config import CodistillConfig, TrainConfig

V, TOKENS, B, T, K = 300, 280, 2, 23, 6   # config vocabulary padded beyond the tokenizer's 280 tokens


def student(tied: bool, bias: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied))
    if bias:
        model.lm_head = torch.nn.Linear(32, V, bias=True)
    return model


def batch_of(seed: int = 0) -> dict:
    """Every per-position row a loss reads, ids below the tokenizer's width;
    position 1's top-k cut short (min-prob, or an id beyond the logits:
    empty slots, -inf); a padded tail on row 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TOKENS, (B, T), generator=g)
    mask = torch.ones(B, T - 1, dtype=torch.bool)
    mask[1, 15:] = False
    lp = torch.log_softmax(torch.randn(B, T - 1, TOKENS, generator=g) * 2, -1)
    top = lp.topk(K, -1)
    topk_lp = top.values.clone()
    topk_lp[:, 1, 3:] = float("-inf")
    draws = torch.multinomial(lp.exp().reshape(-1, TOKENS), 5, replacement=True, generator=g).reshape(B, T - 1, 5)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "targets": ids[:, 1:].clone(), "mask": mask,
            "topk_ids": top.indices, "topk_logprobs": topk_lp,
            "coverage": topk_lp.exp().sum(-1), "sampled_ids": draws,
            "sampled_weights": torch.full(draws.shape, 0.2),
            "sampled_coverage": 0.3 + 0.6 * torch.rand(B, T - 1, generator=g),
            "sampled_logprobs": lp.gather(-1, draws),
            "teacher_logprob": lp.gather(-1, ids[:, 1:, None]).squeeze(-1),
            "sampling_logprob": lp.gather(-1, ids[:, 1:, None]).squeeze(-1) - 0.3 * torch.rand(B, T - 1, generator=g),
            "kd_mask": mask & (torch.rand(B, T - 1, generator=g) < 0.7),
            "target_bytes": torch.randint(1, 5, (B, T - 1), generator=g).float()}


ROWS = {"topk": ("topk_ids", "topk_logprobs", "coverage"), "sampled": ("sampled_ids", "sampled_weights"),
        "sampled tail": ("sampled_ids", "sampled_weights", "sampled_coverage"),
        "sampled tail, logprobs": ("sampled_ids", "sampled_weights", "sampled_coverage", "sampled_logprobs"),
        "scored": ("topk_ids", "topk_logprobs", "coverage", "teacher_logprob", "sampling_logprob"),
        "cross": ("topk_ids", "topk_logprobs", "coverage", "kd_mask")}
CASES = {   # name -> (settings, alpha, rows)
    "CE": (dict(loss="ce"), 1.0, "topk"),
    "top-k tail": (dict(tail="tail"), 0.0, "topk"),
    "top-k tail, reverse": (dict(tail="tail", kd_kind="reverse"), 0.0, "topk"),
    "top-k renorm, jsd": (dict(tail="renorm", kd_kind="jsd", beta=0.3), 0.0, "topk"),
    "top-k renorm, T=2": (dict(tail="renorm", kd_temperature=2.0), 0.0, "topk"),
    "top-k target, alpha 0.3": (dict(tail="target"), 0.3, "topk"),
    "sampled": (dict(), 0.0, "sampled"),
    "sampled, T=2": (dict(kd_temperature=2.0), 0.5, "sampled"),
    "sampled tail bucket": (dict(tail="tail"), 0.2, "sampled tail"),
    "sampled tail bucket, logprobs, jsd": (dict(tail="tail", kd_kind="jsd"), 0.0, "sampled tail, logprobs"),
    "on-policy + forward KL": (dict(loss="opd", opd_forward_kl=0.5), 0.0, "scored"),
    "cross-tokenizer": (dict(tail="tail"), 0.2, "cross"),
}


def rows_for(batch: dict, which: str) -> dict:
    keep = ("input_ids", "attention_mask", "targets", "mask", *ROWS[which])
    return {k: v for k, v in batch.items() if k in keep}


def step(model, batch: dict, settings: dict, alpha: float, chunk_mb: int) -> tuple[dict, dict]:
    from student_train.objective import loss_step
    cfg = TrainConfig(labels=("l",), out="o", student="s", head_chunk_mb=chunk_mb, **settings)
    model.zero_grad(set_to_none=True)
    out = loss_step(model, batch, cfg, alpha)
    out["objective"].backward()
    return ({k: v.detach() for k, v in out.items()},
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


def assert_same(dense: dict, chunked: dict, rel: float = 1e-5) -> None:
    assert dense.keys() == chunked.keys()
    for name in dense:
        a, b = dense[name], chunked[name]
        scale = a.abs().max().clamp(min=1e-12)
        assert ((a - b).abs().max() / scale).item() <= rel, name


@pytest.fixture
def small_chunks(monkeypatch):
    """7 positions a chunk: 44 positions make 6 uneven chunks."""
    monkeypatch.setattr(head, "positions", lambda chunk_mb, width, device: 7)


@pytest.mark.parametrize("tied,bias", [(False, False), (True, False), (False, True)], ids=["untied", "tied", "bias"])
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_head_gives_the_full_logits_loss_and_gradients(case, tied, bias, small_chunks):
    settings, alpha, which = CASES[case]
    model, batch = student(tied, bias), rows_for(batch_of(), which)
    assert head.chunkable(model)
    dense_out, dense_grads = step(model, batch, settings, alpha, chunk_mb=0)
    out, grads = step(model, batch, settings, alpha, chunk_mb=1)
    assert_same(dense_out, out)
    assert_same(dense_grads, grads)
    assert "lm_head.weight" in grads or tied


def test_held_out_metrics_are_the_same_chunk_by_chunk(small_chunks):
    from student_train.train import score
    model, batch = student(tied=False), batch_of()
    for rows in ("topk", "cross"):
        b = {**rows_for(batch, rows), "target_bytes": batch["target_bytes"]}
        with torch.no_grad():
            dense, chunked = score({"student": model}, b, head_chunk_mb=0), score({"student": model}, b, head_chunk_mb=1)
        assert set(dense) == set(chunked) >= {"ce", "kl", "top1", "bytes", "ece_gap00", "ece_gap14"}
        for name in dense:
            assert chunked[name].item() == pytest.approx(dense[name].item(), rel=1e-5, abs=1e-7), name


@pytest.mark.parametrize("kd", ["full", "topk"])
def test_codistill_step_is_the_same_chunk_by_chunk(kd, small_chunks):
    from student_train.codistill import micro_step
    batch = rows_for(batch_of(), "topk")
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "targets", "mask")}
    results = []
    for chunk_mb in (0, 1):
        models = {"teacher": student(tied=False, seed=1), "student": student(tied=True)}
        cfg = CodistillConfig(inputs=("c",), out="o", teacher="t", student="s", kd=kd, k=8, tail="tail",
                              head_chunk_mb=chunk_mb)
        out = micro_step(models, batch, 0.25, lambda loss: loss.backward(), cfg=cfg, n_vocab=TOKENS)
        grads = {f"{m}.{n}": p.grad.clone() for m, model in models.items() for n, p in model.named_parameters()}
        results.append(({k: v.detach() for k, v in out.items()}, grads))
    assert_same(results[0][0], results[1][0])
    assert_same(results[0][1], results[1][1])


def test_no_tensor_holds_the_logits_of_every_position(small_chunks):
    """Forward and backward of top-k KD: the most positions any [..., V]
    tensor holds is one chunk's 7, not the batch's 44 (the head weight's
    [32, V] view aside)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Widest(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == V and t.numel() // V != 32:
                    self.rows = max(self.rows, t.numel() // V)
            return out
    model, batch = student(tied=False), rows_for(batch_of(), "topk")
    head.chunkable(model)
    seen = {}
    for chunk_mb in (1, 0):
        with Widest() as mode:
            step(model, batch, dict(tail="tail"), 0.5, chunk_mb)
        seen[chunk_mb] = mode.rows
    assert seen == {1: 7, 0: B * T}   # the old path does make them


def test_a_model_that_changes_its_heads_output_keeps_the_full_logits(small_chunks):
    """Gemma 2 soft-caps its logits after the head: the chunked path would
    skip that, so it is found out and the model's own logits are used."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           final_logit_softcapping=2.0))
    with pytest.warns(UserWarning, match="Gemma2ForCausalLM: its forward changes its LM head's output"):
        assert not head.chunkable(model)
    batch = rows_for(batch_of(), "topk")
    dense_out, dense_grads = step(model, batch, dict(tail="tail"), 0.0, chunk_mb=0)
    out, grads = step(model, batch, dict(tail="tail"), 0.0, chunk_mb=1)
    assert_same(dense_out, out, rel=0)
    assert_same(dense_grads, grads, rel=0)


def test_bf16_autocast_stays_within_bf16_of_the_full_logits(small_chunks):
    model, batch = student(tied=False), rows_for(batch_of(), "topk")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense_out, dense_grads = step(model, batch, dict(tail="tail"), 0.0, chunk_mb=0)
        out, grads = step(model, batch, dict(tail="tail"), 0.0, chunk_mb=1)
    assert out["objective"].item() == pytest.approx(dense_out["objective"].item(), rel=2e-2)
    for name in grads:
        cos = torch.nn.functional.cosine_similarity(grads[name].flatten().float(), dense_grads[name].flatten().float(), 0)
        assert cos > 0.99, name


def test_evaluation_under_no_grad_computes_no_gradient(small_chunks):
    model, batch = student(tied=False), rows_for(batch_of(), "topk")
    from student_train.objective import loss_step
    cfg = TrainConfig(labels=("l",), out="o", student="s")
    with torch.no_grad():
        out = loss_step(model, batch, cfg, 0.0)
    assert not out["objective"].requires_grad and torch.isfinite(out["kd"])
    assert functools.reduce(lambda a, p: a and p.grad is None, model.parameters(), True)


def test_a_negative_chunk_size_is_refused_naming_the_option():
    with pytest.raises(ValueError, match=r"--head-chunk-mb: must be >= 0 \(0: the model's full logits\), got -1"):
        TrainConfig(labels=("l",), out="o", student="s", head_chunk_mb=-1)
    with pytest.raises(ValueError, match="--head-chunk-mb"):
        CodistillConfig(inputs=("c",), out="o", teacher="t", student="s", head_chunk_mb=-0.5)
