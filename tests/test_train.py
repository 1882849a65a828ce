import json
import math
import os
import shutil

import pytest
from helpers import torchrun_student_train
from typer.testing import CliRunner

from student_train.cli import app
from student_train.config import TrainConfig
from student_train.train import train

runner = CliRunner()


def tcfg(labels, student_config, out, **kw):
    base = dict(labels=(str(labels),), student_config=student_config, out=str(out), max_steps=12, batch_size=4,
                lr=3e-3, warmup_steps=2, eval_holdout=1, eval_every=4, eval_batches=4, save_every=6, log_every=1,
                progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def metrics(out):
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]


def test_resume_reproduces_the_losses_of_an_uninterrupted_run(topk_labels, student_config, tmp_path):
    train(tcfg(topk_labels, student_config, tmp_path / "straight"))
    train(tcfg(topk_labels, student_config, tmp_path / "stopped", max_steps=12))
    # Simulate a preemption after step 6: drop the later checkpoint and keep the log as it was.
    shutil.rmtree(tmp_path / "stopped" / "step_000012")
    train(tcfg(topk_labels, student_config, tmp_path / "stopped", resume=True))
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "stopped")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in ("loss", "ce", "kd", "eval_ce", "eval_kl", "eval_ece"):
            if x.get(key) is not None:
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (x["step"], key)


def test_checkpoints_hold_an_hf_model_and_the_run_state(topk_labels, student_config, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    train(tcfg(topk_labels, student_config, tmp_path / "r", max_steps=6))
    ck = tmp_path / "r" / "step_000006"
    assert AutoModelForCausalLM.from_pretrained(ck).config.vocab_size == 512
    assert len(AutoTokenizer.from_pretrained(ck)) == 512
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["step"] == 6 and meta["config"]["loss"] == "kd" and meta["labels_fingerprints"][0].startswith("sha256:")
    for f in ("optimizer.pt", "scheduler.json", "rng.pt", "loader.json"):
        assert (ck / f).is_file()


def test_topk_kd_brings_the_student_closer_to_the_teacher_than_ce(topk_labels, student_config, tmp_path):
    common = dict(max_steps=40, eval_every=40, save_every=0, lr=5e-3)
    train(tcfg(topk_labels, student_config, tmp_path / "kd", loss="kd", **common))
    train(tcfg(topk_labels, student_config, tmp_path / "ce", loss="ce", **common))
    kd, ce = metrics(tmp_path / "kd"), metrics(tmp_path / "ce")
    start, kd_end, ce_end = kd[0]["eval_kl"], kd[-1]["eval_kl"], ce[-1]["eval_kl"]
    assert kd_end < 0.5 * start, (start, kd_end)
    assert kd_end < ce_end, (kd_end, ce_end)
    evals = [r for r in kd if "eval_ce" in r]
    assert all(0 <= r["eval_ece"] <= 1 for r in evals) and not [k for k in evals[0] if "gap" in k]
    # Bits per byte for a same-tokenizer run too: every report row compares in one unit.
    assert all(0 < r["eval_bpb"] < r["eval_ce"] / math.log(2) for r in evals)


def test_same_tokenizer_eval_batches_carry_the_bytes_of_their_targets(topk_labels):
    from student_train.data import LabelStream, open_label_sets
    from student_train.vocab import load_tokenizer_for, token_byte_lengths
    from student_train.xtok import token_bytes
    tok = load_tokenizer_for(None, topk_labels)
    lengths = token_byte_lengths(tok, 512)
    batch, _ = next(iter(LabelStream(open_label_sets([str(topk_labels)]), 4, shuffle=False, byte_lengths=lengths)))
    pieces = token_bytes(tok)
    expect = [[len(pieces[t]) if m else 0 for t, m in zip(ts, ms)] for ts, ms in zip(batch["targets"].tolist(),
                                                                                      batch["mask"].tolist())]
    assert batch["target_bytes"].tolist() == expect and batch["target_bytes"].sum() > 0


def test_the_missing_mass_on_the_actual_token_trains_from_the_command_line(topk_labels, student_config, tmp_path):
    r = runner.invoke(app, ["train", "--labels", str(topk_labels), "--student-config", student_config, "--out",
                            str(tmp_path / "target"), "--tail", "target", "--max-steps", "8", "--lr", "5e-3",
                            "--log-every", "1", "--no-progress", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    kd = [rec["kd"] for rec in metrics(tmp_path / "target") if "kd" in rec]
    assert len(kd) == 8 and all(math.isfinite(x) for x in kd) and kd[-1] < kd[0]
    r = runner.invoke(app, ["train", "--labels", str(topk_labels), "--student-config", student_config, "--out",
                            str(tmp_path / "x"), "--tail", "target", "--kd-kind", "reverse"])
    assert r.exit_code == 2 and "--kd-kind: must be forward or jsd with --tail target" in r.output


@pytest.mark.slow
def test_two_process_torchrun_on_gloo_ends_with_identical_weights(topk_labels, student_config, tmp_path):
    torchrun_student_train(29517, "train", "--labels", str(topk_labels), "--student-config", student_config,
                           "--out", str(tmp_path / "ddp"), "--max-steps", "6", "--batch-size", "2", "--save-every", "6",
                           "--eval-holdout", "1", "--eval-every", "3", "--eval-batches", "2")
    last = metrics(tmp_path / "ddp")[-1]
    assert last["step"] == 6 and len(last["weight_digests"]) == 2
    assert last["weight_digests"][0] == last["weight_digests"][1]
    assert (tmp_path / "ddp" / "step_000006" / "model.safetensors").is_file()


def test_dry_run_prints_the_resolved_config(tmp_path):
    (tmp_path / "t.yaml").write_text("labels: [a]\nstudent_config: s.json\nout: o\nloss: ce\n")
    r = runner.invoke(app, ["train", str(tmp_path / "t.yaml"), "--lr", "0.01", "--dry-run"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["labels"] == ["a"] and d["lr"] == 0.01 and d["loss"] == "ce" and d["max_steps"] == 1000


@pytest.mark.slow
def test_fsdp_two_process_run_resumes_to_the_same_losses(topk_labels, student_config, tmp_path):
    def torchrun(out, port, *extra):
        torchrun_student_train(port, "train", "--labels", str(topk_labels), "--student-config", student_config,
                               "--out", str(out), "--max-steps", "6", "--batch-size", "2", "--save-every", "3",
                               "--log-every", "1", "--eval-every", "0", "--fsdp", *extra)
    torchrun(tmp_path / "straight", 29521, "--head-chunk-mb", "0.05")   # 25 positions a chunk: several per batch
    torchrun(tmp_path / "resumed", 29522, "--head-chunk-mb", "0.05")
    shutil.rmtree(tmp_path / "resumed" / "step_000006")
    torchrun(tmp_path / "resumed", 29523, "--resume", "--head-chunk-mb", "0.05")
    torchrun(tmp_path / "full_logits", 29528, "--head-chunk-mb", "0")   # the model's full logits: the same losses
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    # The full logits sum in another order: after optimizer steps fp32 differs by CPU kernel (AVX2 vs AVX512), so
    # this compares at 1e-4 (a wrong chunked loss is off by far more); the resumed run above is exact by construction.
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in metrics(tmp_path / "full_logits")], rel=1e-4)
    assert a[-1]["weight_digests"][0] == a[-1]["weight_digests"][1]
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "step_000006").num_parameters() > 0



def test_gradient_accumulation_weighs_micro_batches_by_their_tokens():
    """Two micro-batches accumulated as the loop does (loss x counted tokens,
    then to_token_mean) give the gradient of one batch holding both: a
    micro-batch counts by its target tokens, not as half of the step (a short
    window used to weigh as much as a full one)."""
    import torch
    from student_train.losses import cross_entropy
    from student_train.runtime import Dist, to_token_mean
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50))
    ids = torch.randint(0, 50, (4, 12))
    mask = torch.ones(4, 11, dtype=torch.bool)
    mask[2:, 3:] = False                      # the second micro-batch: short windows, 3 targets each

    def ce(rows):
        return cross_entropy(model(ids[rows, :-1]), ids[rows, 1:], mask[rows])

    ce(slice(0, 4)).backward()
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    parts = [slice(0, 2), slice(2, 4)]
    counts = [int(mask[r].sum()) for r in parts]
    assert counts == [22, 6]
    for rows, n in zip(parts, counts):
        (ce(rows) * n).backward()
    to_token_mean([model], sum(counts), Dist())
    for a, b in zip(whole, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b)
