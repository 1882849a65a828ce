"""Label shards through transformers.Trainer (student_train.hf)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from student_train.config import TrainConfig
from student_train.data import LabelStream, open_label_sets
from student_train.hf import DistillLoss, DistillTrainer, LabelDataset
from student_train.runtime import build_model
from student_train.train import micro_step
from student_train.vocab import load_tokenizer_for

DOCS = Path(__file__).resolve().parents[1] / "docs" / "trainer.md"


def student_and_tokenizer(labels, student_config):
    tok = load_tokenizer_for(None, Path(labels))
    return build_model(None, student_config, tok, 0), tok


@pytest.mark.parametrize("labels, loss", [
    ("scored", dict(loss="opd", opd_forward_kl=0.5)),
    ("topk", dict(tail="tail", ce_weight=0.0)),
    ("topk", dict(tail="target", ce_weight=0.0)),
    ("topk", dict(tail="renorm", ce_weight=0.3, kd_temperature=2.0, kd_kind="jsd")),
    ("sampled", dict(ce_weight=0.5)),
    ("sampled", dict(tail="tail", ce_weight=0.2)),   # the drawn ids + a bucket for the teacher's rest (format 2.2)
    ("topk", dict(loss="ce")),
])
def test_the_same_batch_gives_the_same_loss_through_student_train_and_trainer(topk_labels, sampled_labels, scored_labels,
                                                                              student_config, tmp_path, labels, loss):
    from transformers import TrainingArguments
    labels = {"topk": topk_labels, "sampled": sampled_labels, "scored": scored_labels}[labels]
    batch, _ = next(iter(LabelStream(open_label_sets([str(labels)]), 4, shuffle=False)))
    data = LabelDataset(str(labels), shuffle=False)
    examples = [e for _, e in zip(range(4), data)]
    model, tok = student_and_tokenizer(labels, student_config)
    trainer = DistillTrainer(model=model, args=TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True),
                             train_dataset=data, processing_class=tok, loss=DistillLoss(**loss))
    hf_batch = trainer.data_collator(examples)
    for key, value in batch.items():
        torch.testing.assert_close(hf_batch[key], value, rtol=0, atol=0, msg=key)
    n = int(batch["mask"].sum())
    assert int((hf_batch["labels"] != -100).sum()) == n   # what Trainer counts as the batch's tokens
    cfg = TrainConfig(labels=(str(labels),), out="unused", student_config=student_config, **loss)
    alpha = cfg.ce_weight_at(0)
    with torch.no_grad():
        ours = micro_step({"student": model}, batch, alpha, lambda objective: None, cfg=cfg)["loss"]
        theirs = trainer.compute_loss(model, hf_batch)
        # Accumulated over 3n tokens, this micro-batch weighs n / 3n.
        scaled = trainer.compute_loss(model, hf_batch, num_items_in_batch=torch.tensor(3 * n))
    assert theirs.item() == pytest.approx(ours.item(), rel=1e-6) and ours.item() != 0   # opd's may be negative
    assert scaled.item() == pytest.approx(ours.item() / 3, rel=1e-6)
    if loss.get("tail") == "tail":   # Trainer's evaluation runs the same loss over a held-out LabelDataset
        assert 0 < trainer.evaluate(LabelDataset(str(labels), shuffle=False))["eval_loss"] < 20


@pytest.mark.parametrize("front", ["DistillTrainer", "KDSFTTrainer"])
def test_a_step_with_no_position_to_count_contributes_nothing_not_nan(topk_labels, student_config, tmp_path, front):
    """A micro-batch whose mask counts nothing, in a step that counts nothing (num_items_in_batch 0: assistant-only
    labels, a window without an assistant token, batch size 1): loss 0 and no gradient, not 0 * 0 / 0 = NaN in
    every weight."""
    from transformers import TrainingArguments
    data = LabelDataset(str(topk_labels), shuffle=False)
    model, tok = student_and_tokenizer(topk_labels, student_config)
    if front == "DistillTrainer":
        trainer = DistillTrainer(model=model, args=TrainingArguments(str(tmp_path), max_steps=1, report_to=[],
                                                                     use_cpu=True),
                                 train_dataset=data, processing_class=tok, loss=DistillLoss())
    else:
        from trl import SFTConfig
        from student_train.trl import KDSFTTrainer
        trainer = KDSFTTrainer(model=model, args=SFTConfig(str(tmp_path), max_steps=1, report_to=[], use_cpu=True),
                               train_dataset=data, processing_class=tok, distill=DistillLoss())
    batch = trainer.data_collator([e for _, e in zip(range(1), data)])
    batch["mask"] = torch.zeros_like(batch["mask"])
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(0))
    loss.backward()
    assert loss.item() == 0
    assert all(p.grad is None or (torch.isfinite(p.grad).all() and not p.grad.any()) for p in model.parameters())


def test_trainer_evaluation_reports_student_train_s_held_out_metrics(topk_labels, student_config, tmp_path):
    from transformers import TrainingArguments
    from student_train.runtime import Dist, evaluate
    from student_train.train import score
    model, tok = student_and_tokenizer(topk_labels, student_config)
    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_eval_batch_size=3, report_to=[], use_cpu=True)
    held_out = LabelDataset(str(topk_labels), shuffle=False)
    trainer = DistillTrainer(model=model, args=args, train_dataset=held_out, processing_class=tok)
    metrics = trainer.evaluate(held_out)
    batches = list(trainer.get_eval_dataloader(held_out))   # the batches Trainer evaluated, uneven token counts
    assert len(batches) > 2
    ours = evaluate({"student": model}, score, batches, Dist(0, 1, 0, torch.device("cpu")), "float32")
    assert 0 < metrics["eval_ece"] < 1 and 0 < metrics["eval_kl"] and 0 < metrics["eval_top1"] < 1
    for name in ("eval_ce", "eval_kl", "eval_top1", "eval_ece"):
        assert metrics[name] == pytest.approx(ours[name], rel=1e-6), name
    assert not [k for k in {**ours, **metrics} if "gap" in k]   # the bins are folded into eval_ece


def test_alpha_moves_to_alpha_end_over_the_trainers_run_as_in_student_train(topk_labels, student_config, tmp_path):
    from transformers import TrainingArguments
    from student_train.objective import loss_step
    loss = DistillLoss(ce_weight=0.0, ce_weight_end=1.0)
    cfg = TrainConfig(labels=(str(topk_labels),), out="unused", student_config=student_config, ce_weight=0.0,
                      ce_weight_end=1.0, max_steps=5)
    assert [loss.ce_weight_at(s, 5) for s in range(5)] == [cfg.ce_weight_at(s) for s in range(5)] == [0, 0.25, 0.5, 0.75, 1]
    assert loss.ce_weight_at(3) == 0.0   # no run length known: alpha stays
    model, tok = student_and_tokenizer(topk_labels, student_config)
    data = LabelDataset(str(topk_labels), shuffle=False)
    trainer = DistillTrainer(model=model, args=TrainingArguments(str(tmp_path), max_steps=5, report_to=[], use_cpu=True),
                             train_dataset=data, processing_class=tok, loss=loss)
    batch = trainer.data_collator([e for _, e in zip(range(4), data)])
    trainer.state.max_steps, trainer.state.global_step = 5, 4   # the last step: CE only
    with torch.no_grad():
        out = loss_step(model, batch, loss, 1.0)
        ce, kd = out["ce"], out["kd"]
        assert trainer.compute_loss(model, batch).item() == pytest.approx(ce.item(), rel=1e-6) and ce.item() != kd.item()


def test_an_eval_label_set_of_another_kind_is_batched_as_its_own(topk_labels, sampled_labels, student_config, tmp_path):
    """Train on sampled labels, evaluate on top-16 ones: the eval batches hold
    the top-16 entries (not the train set's sampled layout) and the loss is
    the one student-train computes on them."""
    from transformers import TrainingArguments
    model, tok = student_and_tokenizer(topk_labels, student_config)
    held_out = LabelDataset(str(topk_labels), shuffle=False)
    trainer = DistillTrainer(model=model, args=TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True,
                                                                 per_device_eval_batch_size=4),
                             train_dataset=LabelDataset(str(sampled_labels)), eval_dataset={"top16": held_out},
                             processing_class=tok, loss=DistillLoss(tail="tail"))
    batch = next(iter(trainer.get_eval_dataloader("top16")))
    expect, _ = next(iter(LabelStream(open_label_sets([str(topk_labels)]), 4, shuffle=False)))
    assert batch["topk_ids"].shape[-1] == 16 and "sampled_counts" not in batch
    torch.testing.assert_close(batch["topk_logprobs"], expect["topk_logprobs"], rtol=0, atol=0)
    assert trainer.data_collator.dataset.stream.kind == "sampled"   # the train set keeps its own
    assert 0 < trainer.evaluate()["eval_top16_loss"] < 20


def test_the_labels_must_fit_the_students_tokenizer(topk_labels, student_config, tmp_path):
    from transformers import TrainingArguments
    from labelgen.tools.demo import train_tokenizer
    from labelgen.format import FormatError
    model, _ = student_and_tokenizer(topk_labels, student_config)
    other = train_tokenizer(["something else entirely " * 30], 300)
    with pytest.raises(FormatError, match="different tokenizer") as refused:
        DistillTrainer(model=model, args=TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True),
                       train_dataset=LabelDataset(str(topk_labels)), processing_class=other)
    # the Python API's way to distill across tokenizers, not the command line's flag
    assert "LabelDataset with student_tokenizer=" in str(refused.value) and "--student" not in str(refused.value)


@pytest.mark.parametrize("width", [600, 300])
def test_without_a_tokenizer_a_student_of_another_width_is_refused_before_training(topk_labels, student_config,
                                                                                   tmp_path, width):
    """Wider: most likely another tokenizer's model (it trained silently); narrower: an IndexError mid-run."""
    from transformers import TrainingArguments
    from labelgen.format import FormatError
    model, _ = student_and_tokenizer(topk_labels, student_config)
    model.resize_token_embeddings(width)
    with pytest.raises(FormatError, match=rf"the student's logits are {width} wide, but the labels' tokenizer has 512 "
                                          r"tokens.*pass the student's tokenizer \(processing_class=...\)"):
        DistillTrainer(model=model, args=TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True),
                       train_dataset=LabelDataset(str(topk_labels)))


def test_an_empty_label_set_says_it_is_empty(tmp_path):
    from labelgen.format import FormatError
    from labelgen.shards import ShardWriter
    with ShardWriter(tmp_path / "empty", "topk", 4, 512):
        pass
    with pytest.raises(FormatError, match=r"empty: the label set is empty \(0 rows\); nothing to read"):
        LabelDataset(str(tmp_path / "empty"))


def doc_script(tmp_path) -> Path:
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert len(blocks) == 1 and len(blocks[0].strip().splitlines()) <= 30
    path = tmp_path / "train_with_trainer.py"
    path.write_text(blocks[0])
    return path


def run_script(script, *args):
    r = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert r.returncode == 0, r.stderr[-3000:]


def losses(out, step):
    state = json.loads((Path(out) / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def kd_on_first_batch(model, labels, student_config) -> float:
    batch, _ = next(iter(LabelStream(open_label_sets([str(labels)]), 8, shuffle=False)))
    cfg = TrainConfig(labels=(str(labels),), out="unused", student_config=student_config, ce_weight=0.1)
    with torch.no_grad():
        return micro_step({"student": model.eval()}, batch, 0.1, lambda objective: None, cfg=cfg)["loss"].item()


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_the_documented_trainer_script_trains_checkpoints_and_resumes(topk_labels, student_config, tmp_path, lora):
    """docs/trainer.md's script as written: after 9 steps the student's loss
    on a fixed batch is lower, and a run restarted from the step-6
    checkpoint logs the same losses after it as the uninterrupted run."""
    if lora:
        pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    script = doc_script(tmp_path)
    model, tok = student_and_tokenizer(topk_labels, student_config)
    model.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    flags = ["--lora"] if lora else []
    run_script(script, topk_labels, tmp_path / "student", tmp_path / "straight", 9, *flags)
    straight = losses(tmp_path / "straight", 9)
    assert sorted(straight) == list(range(1, 10))
    final = tmp_path / "straight" / "checkpoint-9"
    if lora:
        from peft import PeftModel
        assert (final / "adapter_model.safetensors").is_file()
        trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "student"), final)
    else:
        trained = AutoModelForCausalLM.from_pretrained(final)
    before, after = kd_on_first_batch(model, topk_labels, student_config), kd_on_first_batch(trained, topk_labels,
                                                                                              student_config)
    assert after < before - 0.005, (before, after)
    # Interrupted after step 6: only that checkpoint is left, and the script resumes from it.
    shutil.copytree(tmp_path / "straight" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")
    run_script(script, topk_labels, tmp_path / "student", tmp_path / "resumed", 9, *flags)
    resumed = losses(tmp_path / "resumed", 9)
    for s in (7, 8, 9):
        assert resumed[s] == pytest.approx(straight[s], rel=1e-4), s


@pytest.mark.slow
def test_the_documented_script_checkpoints_and_exits_75_on_sigterm_and_then_resumes(topk_labels, student_config,
                                                                                     tmp_path):
    import signal
    import time
    script = doc_script(tmp_path)
    model, tok = student_and_tokenizer(topk_labels, student_config)
    model.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    cmd = [sys.executable, str(script), str(topk_labels), str(tmp_path / "student"), str(tmp_path / "run"), "300"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    end = time.monotonic() + 600
    while not (tmp_path / "run" / "checkpoint-3").is_dir():
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 75, err[-3000:]
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run").glob("checkpoint-*"))
    state = json.loads((tmp_path / "run" / f"checkpoint-{steps[-1]}" / "trainer_state.json").read_text())
    trained = len(re.findall(r"'loss': ", out + err))   # Trainer prints each step's logs (logging_steps=1)
    assert 3 <= state["global_step"] == steps[-1] == trained < 300, (steps, trained)   # the last step is saved
    run_script(script, topk_labels, tmp_path / "student", tmp_path / "run", steps[-1] + 3)   # resumes from it
    assert (tmp_path / "run" / f"checkpoint-{steps[-1] + 3}").is_dir()


def test_distill_trainer_refuses_labels_its_loss_cannot_use_in_one_line(tiny_teacher, corpus, student_config,
                                                                        tmp_path):
    """The default loss (top-k KD) on a tokens label set: the same one line as
    `student-train train` gives, naming the label kind and the loss (it was a
    KeyError: 'topk_ids' at the first step)."""
    from transformers import TrainingArguments
    from labelgen.errors import FormatError
    from labelgen.generate import GenerateConfig, run
    labels = tmp_path / "tokens"
    run(GenerateConfig(teacher=tiny_teacher, inputs=(str(corpus / "docs.jsonl"),), out=str(labels), mode="tokens",
                       max_seq_len=64, progress=False))
    model, tok = student_and_tokenizer(labels, student_config)
    args = TrainingArguments(str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(FormatError) as e:
        DistillTrainer(model=model, args=args, train_dataset=LabelDataset(str(labels)), loss=DistillLoss())
    assert str(e.value) == f"--loss kd needs topk, sampled or scored labels; {labels} holds tokens (use --loss ce)"
    r = subprocess.run([sys.executable, "-m", "student_train.cli", "train", "--labels", str(labels), "--student-config",
                        student_config, "--out", str(tmp_path / "cli"), "--no-progress", "--device", "cpu"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == f"student-train: error: {e.value}", r.stderr
