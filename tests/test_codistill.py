import json
import os
import shutil

import pytest
import torch
from helpers import torchrun_student_train

from labelgen.generate import run as generate
from labelgen.generate.config import GenerateConfig
from student_train.codistill import codistill
from student_train.config import CodistillConfig, TrainConfig
from student_train.train import train


def metrics(out):
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]


def ccfg(tiny_teacher, corpus, student_config, out, **kw):
    base = dict(inputs=(str(corpus / "docs.jsonl"),), out=str(out), teacher=tiny_teacher, student_config=student_config,
                max_steps=8, batch_size=4, max_seq_len=64, rows_per_shard=4, student_lr=3e-3, teacher_lr=1e-3,
                warmup_steps=2, eval_every=0, save_every=4, log_every=1, progress=False, device="cpu")
    base.update(kw)
    return CodistillConfig(**base)


def test_alpha_is_one_during_warmup_then_ramps_to_the_target():
    cfg = CodistillConfig(inputs=("x",), out="o", teacher="t", student="s", max_steps=20, ce_weight=0.2,
                          ce_weight_warmup_steps=5, ce_weight_ramp_steps=10)
    assert [cfg.ce_weight_at(s) for s in (0, 4)] == [1.0, 1.0]
    assert cfg.ce_weight_at(10) == pytest.approx(0.6)
    assert cfg.ce_weight_at(15) == cfg.ce_weight_at(19) == pytest.approx(0.2)
    cos = CodistillConfig(**{**cfg.__dict__, "ce_weight_schedule": "cosine"})
    assert cos.ce_weight_at(10) == pytest.approx(0.6) and cos.ce_weight_at(7) > cfg.ce_weight_at(7)


def test_the_lr_schedule_ends_at_the_end_of_the_run_under_gradient_accumulation(tiny_teacher, corpus, student_config,
                                                                                  tmp_path):
    """Steps are optimizer steps: with --grad-accum 4 each of the 3 steps
    takes 4 batches, and both models' cosines reach min_lr_ratio at the last
    step (a horizon counted in batches used to end near the peak)."""
    codistill(ccfg(tiny_teacher, corpus, student_config, tmp_path / "co", grad_accum=4, max_steps=3, warmup_steps=1,
                   min_lr_ratio=0.1, save_every=0))
    final = tmp_path / "co" / "step_000003"
    for name, lr in (("student", 3e-3), ("teacher", 1e-3)):
        sched = json.loads((final / name / "scheduler.json").read_text())
        assert sched["last_epoch"] == 3 and sched["_last_lr"][0] == pytest.approx(0.1 * lr), name


def test_accumulated_micro_batches_weigh_by_their_tokens(tiny_teacher, corpus, student_config, tmp_path, monkeypatch):
    """Two micro-batches of 2 rows accumulated give the student the gradient
    of one batch of the same 4 rows: each counts by its target tokens, not as
    half of the step. Compared on the first step's gradient, before AdamW's
    per-coordinate division turns fp32 rounding in another summation order
    into differences of the learning rate's size on near-zero weights; and
    checked to tell token weighting from equal weighting of the micro-batches
    (the same contributions averaged per micro-batch are far from it)."""
    import student_train.codistill as co
    import student_train.runtime as runtime
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    text = json.loads(open(corpus / "docs.jsonl").readline())["text"]
    with open(tmp_path / "short.jsonl", "w") as f:   # 4 one-window documents of about 5, 10, 20 and 40 tokens:
        for want in (5, 10, 20, 40):                 # however 2 + 2 of them pair up, the halves differ in tokens
            end = next(e for e in range(1, len(text)) if len(tok(text[:e])["input_ids"]) >= want)
            f.write(json.dumps({"text": text[:end]}) + "\n")
    seen = {"micro": [], "step": []}

    def flat_grads(model):
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten()
                          for p in model.parameters()])

    def spy_micro_step(models, batch, alpha, backward, **kw):
        before = flat_grads(models["student"])
        out = micro_step(models, batch, alpha, backward, **kw)
        seen["micro"].append((int(batch["mask"].sum()), flat_grads(models["student"]) - before))
        return out

    def spy_token_mean(models, total, d):
        to_token_mean(models, total, d)
        seen["step"].append(flat_grads(models[0]))

    micro_step, to_token_mean = co.micro_step, runtime.to_token_mean
    monkeypatch.setattr(co, "micro_step", spy_micro_step)
    monkeypatch.setattr(runtime, "to_token_mean", spy_token_mean)
    common = dict(teacher_lr=0.0, kd="full", save_every=0, warmup_steps=1, max_steps=1,
                  inputs=(str(tmp_path / "short.jsonl"),))
    codistill(ccfg(tiny_teacher, corpus, student_config, tmp_path / "whole", batch_size=4, **common))
    (whole,), seen["step"] = seen["step"], []
    seen["micro"] = []
    codistill(ccfg(tiny_teacher, corpus, student_config, tmp_path / "split", batch_size=2, grad_accum=2, **common))
    (split,), ((n1, g1), (n2, g2)) = seen["step"], seen["micro"]
    assert n1 != n2   # micro-batches of different token counts: the weighting matters

    def off(g) -> float:
        return float((g - whole).norm() / whole.norm())
    assert off(split) < 1e-4   # fp32 sums in another order: ~1e-7
    assert off((g1 + g2) / (n1 + n2)) < 1e-4
    assert off((g1 / n1 + g2 / n2) / 2) > 1e-2   # weighing the micro-batches equally would fail the check above


def test_with_alpha_one_the_student_follows_a_plain_ce_run(tiny_teacher, corpus, student_config, tmp_path):
    codistill(ccfg(tiny_teacher, corpus, student_config, tmp_path / "co", ce_weight=1.0))
    train(TrainConfig(labels=(str(tmp_path / "co" / "data"),), student_config=student_config, out=str(tmp_path / "ce"),
                      loss="ce", max_steps=8, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=0, save_every=0,
                      log_every=1, progress=False, device="cpu"))
    co, ce = metrics(tmp_path / "co"), metrics(tmp_path / "ce")
    assert [r["ce"] for r in co] == pytest.approx([r["ce"] for r in ce], rel=1e-5)
    assert co[-1]["teacher_ce"] != co[0]["teacher_ce"]   # the teacher trained alongside


def test_a_frozen_pretrained_teacher_gives_online_kd_equal_to_offline_full_labels(tiny_teacher, corpus, student_config,
                                                                                  tmp_path):
    codistill(ccfg(tiny_teacher, corpus, student_config, tmp_path / "co", ce_weight=0.5, teacher_lr=0.0, kd="full"))
    # Offline: the same windows labelled with all 512 logprobs, exactly (f32, rank order).
    generate(GenerateConfig(teacher=tiny_teacher, inputs=(str(corpus / "docs.jsonl"),), out=str(tmp_path / "labels"),
                            k=512, max_seq_len=64, rows_per_shard=4, progress=False, device="cpu",
                            encoding={"id_order": "rank", "logprob_codec": "f32"}))
    train(TrainConfig(labels=(str(tmp_path / "labels"),), student_config=student_config, out=str(tmp_path / "kd"),
                      loss="kd", ce_weight=0.5, max_steps=8, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=0,
                      save_every=0, log_every=1, progress=False, device="cpu"))
    co, kd = metrics(tmp_path / "co"), metrics(tmp_path / "kd")
    assert [r["ce"] for r in co] == pytest.approx([r["ce"] for r in kd], rel=1e-4)
    assert [r["kd"] for r in co] == pytest.approx([r["kd"] for r in kd], rel=1e-3, abs=1e-5)
    assert co[0]["teacher_ce"] < 6.0   # pretrained (log 512 = 6.24), and its weights stay as they were:
    from safetensors.torch import load_file
    a = load_file(os.path.join(tiny_teacher, "model.safetensors"))
    b = load_file(str(tmp_path / "co" / "step_000008" / "teacher" / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)


def test_resume_reproduces_an_uninterrupted_codistill_run(tiny_teacher, corpus, student_config, tmp_path):
    c = dict(ce_weight=0.5, ce_weight_warmup_steps=2, ce_weight_ramp_steps=2, teacher_config=None)
    codistill(ccfg(tiny_teacher, corpus, student_config, tmp_path / "a", **c))
    codistill(ccfg(tiny_teacher, corpus, student_config, tmp_path / "b", **c))
    shutil.rmtree(tmp_path / "b" / "step_000008")
    codistill(ccfg(tiny_teacher, corpus, student_config, tmp_path / "b", resume=True, **c))
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    for x, y in zip(a, b):
        for key in ("loss", "ce", "teacher_ce", "kd"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)
    assert (tmp_path / "b" / "step_000008" / "teacher" / "config.json").is_file()


@pytest.mark.slow
def test_two_process_torchrun_codistill_ends_with_identical_weights(tiny_teacher, corpus, student_config, tmp_path):
    torchrun_student_train(29519, "codistill", "--input", str(corpus / "docs.jsonl"), "--teacher", tiny_teacher,
                           "--student-config", student_config, "--out", str(tmp_path / "ddp"), "--max-steps", "4",
                           "--batch-size", "2", "--max-seq-len", "64", "--ce-weight", "0.5", "--save-every", "4")
    d = metrics(tmp_path / "ddp")[-1]["weight_digests"]
    assert len(d) == 4 and d[0] == d[1] and d[2] == d[3]


@pytest.mark.slow
def test_fsdp_two_process_codistill_resumes_to_the_same_losses(tiny_teacher, corpus, student_config, tmp_path):
    """The loop train uses, with both models sharded: a run resumed from its
    step-2 checkpoint logs the losses of the uninterrupted one."""
    def torchrun(out, port, *extra):
        torchrun_student_train(port, "codistill", "--input", str(corpus / "docs.jsonl"), "--teacher", tiny_teacher,
                               "--student-config", student_config, "--out", str(out), "--max-steps", "4",
                               "--batch-size", "2", "--max-seq-len", "64", "--ce-weight", "0.5", "--save-every", "2",
                               "--log-every", "1", "--fsdp", *extra)
    torchrun(tmp_path / "straight", 29524, "--head-chunk-mb", "0.05")   # 25 positions a chunk: several per batch
    torchrun(tmp_path / "resumed", 29525, "--head-chunk-mb", "0.05")
    shutil.rmtree(tmp_path / "resumed" / "step_000004")
    torchrun(tmp_path / "resumed", 29526, "--resume", "--head-chunk-mb", "0.05")
    torchrun(tmp_path / "full_logits", 29529, "--head-chunk-mb", "0")
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    full = metrics(tmp_path / "full_logits")
    for key in ("loss", "ce", "teacher_ce"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-5), key
        # another summation order after optimizer steps: fp32 differs by CPU kernel, so 1e-4 (exact above: a resume)
        assert [r[key] for r in a] == pytest.approx([r[key] for r in full], rel=1e-4), key
    d = a[-1]["weight_digests"]
    assert len(d) == 4 and d[0] == d[1] and d[2] == d[3]
    assert (tmp_path / "straight" / "step_000004" / "teacher" / "model.safetensors").is_file()


@pytest.mark.parametrize("kw, message", [
    (dict(ce_weight=1.5), r"--ce-weight: must be in \[0, 1\]"),
    (dict(ce_weight_warmup_steps=6, ce_weight_ramp_steps=6), r"the CE weight's schedule \(6 \+ 6 steps\) is longer than the run"),
    (dict(teacher=None, teacher_config="t.json"), r"--tokenizer: required when both models are built from configs"),
    (dict(grad_clip=-1.0), r"--grad-clip: must be >= 0"),
])
def test_bad_codistill_settings_fail_before_the_first_step(tiny_teacher, corpus, student_config, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        ccfg(tiny_teacher, corpus, student_config, tmp_path / "x", **kw)


def test_mismatched_tokenizers_are_refused(tiny_teacher, corpus, student_config, tmp_path):
    from labelgen.tools.demo import train_tokenizer
    train_tokenizer(["something else entirely " * 30], 300).save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match=r"different tokenizers \(differ in: vocabulary size"):
        codistill(ccfg(tiny_teacher, corpus, student_config, tmp_path / "x", tokenizer=str(tmp_path / "tok")))


def test_one_codistill_step_trains_the_teacher_on_ce_and_the_student_on_the_mix_through_detached_teacher_logits():
    """The co-distillation step's gradients on one batch, against each term
    computed alone: the teacher's gradient is its own CE's (the student's loss
    does not reach it: its logits are detached), the student's is
    alpha * grad CE + (1 - alpha) * grad KD, and KD's part is not zero. (Whether a
    co-distilled student ends ahead of a CE-only one is a measurement:
    benchmarks/bench_codistill.py --quality.)"""
    from transformers import LlamaConfig, LlamaForCausalLM
    from student_train import losses
    from student_train.codistill import micro_step
    arch = dict(vocab_size=64, max_position_embeddings=32, num_attention_heads=1, num_key_value_heads=1)
    torch.manual_seed(0)
    models = {"teacher": LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, **arch)),
              "student": LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                      head_dim=32, **arch))}
    ids = torch.randint(0, 64, (3, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "targets": ids[:, 1:],
             "mask": torch.ones(3, 11, dtype=torch.bool)}
    cfg = CodistillConfig(inputs=("x",), out="o", teacher="t", student="s", kd="full")

    def grads(model):
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        return g

    micro_step(models, batch, 0.3, lambda objective: objective.backward(), cfg=cfg, n_vocab=64)
    teacher_g, student_g = grads(models["teacher"]), grads(models["student"])
    n = batch["mask"].sum()
    t_logits = models["teacher"](input_ids=ids).logits[:, :-1]
    losses.cross_entropy(t_logits, batch["targets"], batch["mask"]).backward()
    assert torch.allclose(teacher_g, grads(models["teacher"]), atol=1e-6)
    s_logits = models["student"](input_ids=ids).logits[:, :-1]
    ce = losses.cross_entropy(s_logits, batch["targets"], batch["mask"])
    kd = losses.full_kd_terms(s_logits, t_logits.detach(), batch["mask"]).sum() / n
    ce.backward(retain_graph=True)
    g_ce = grads(models["student"])
    kd.backward()
    g_kd = grads(models["student"])
    assert torch.allclose(student_g, 0.3 * g_ce + 0.7 * g_kd, atol=1e-6)
    assert (student_g - 0.3 * g_ce).norm() > 1e3 * 1e-6   # KD's share is far above that tolerance
