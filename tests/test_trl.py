"""Label shards through TRL's own SFTTrainer and SFTConfig (student_train.trl):
the same loss and held-out metrics as student-train on the same batches, the
chunked LM head, what SFTConfig options cannot mean here refused in one line,
docs/trl.md's script trained, resumed (whole and with LoRA) and run under
DDP, and 20 steps ending where student-train's 20 end."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="pip install -e '.[trl]'")
from trl import SFTConfig

from labelgen.errors import LabelgenError, OptionError
from student_train.config import TrainConfig
from student_train.runtime import build_model
from student_train.train import micro_step
from student_train.trl import DistillLoss, KDSFTTrainer, LabelDataset
from student_train.vocab import load_tokenizer_for

DOCS = Path(__file__).resolve().parents[1] / "docs" / "trl.md"


def student_and_tokenizer(labels, student_config):
    tok = load_tokenizer_for(None, Path(labels))
    return build_model(None, student_config, tok, 0), tok


def config(out, **kw) -> SFTConfig:
    return SFTConfig(str(out), **{**dict(max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                                         bf16=False, gradient_checkpointing=False, logging_steps=1), **kw})


@pytest.mark.parametrize("labels, loss", [
    ("topk", dict(tail="tail", ce_weight=0.0)),
    ("topk", dict(tail="target", ce_weight=0.1)),
    ("topk", dict(tail="renorm", ce_weight=0.3, kd_temperature=2.0, kd_kind="jsd")),
    ("sampled", dict(ce_weight=0.5)),
    ("topk", dict(loss="ce")),
])
def test_the_same_batch_gives_the_same_loss_through_trl_and_student_train(topk_labels, sampled_labels, student_config,
                                                                          tmp_path, labels, loss):
    where = {"topk": topk_labels, "sampled": sampled_labels}[labels]
    model, tok = student_and_tokenizer(where, student_config)
    data = LabelDataset(str(where), shuffle=False)
    args = config(tmp_path)
    trainer = KDSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                           distill=DistillLoss(**loss))
    assert trainer.train_dataset.stream.readers is data.stream.readers   # the same labels, in a copy of its own
    assert trainer.args.dataset_kwargs["skip_prepare_dataset"]
    assert not (args.dataset_kwargs or {}).get("skip_prepare_dataset") and args.remove_unused_columns
    batch = trainer.data_collator([e for _, e in zip(range(4), data)])
    cfg = TrainConfig(labels=(str(where),), out="unused", student_config=student_config, **loss)
    with torch.no_grad():
        ours = micro_step({"student": model}, batch, cfg.ce_weight_at(0, 2), lambda objective: None, cfg=cfg)["loss"]
        theirs = trainer.compute_loss(model, batch)
        n = int(batch["mask"].sum())   # accumulated: this micro-batch's share of the step's counted positions
        scaled = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(3 * n))
    assert theirs.item() == pytest.approx(ours.item(), rel=1e-6, abs=1e-6) and ours.item() != 0
    assert scaled.item() == pytest.approx(ours.item() / 3, rel=1e-6)
    assert trainer._metrics["train"]["ce"] and trainer._metrics["train"]["kd"]   # logged as TRL logs its own


def test_the_lm_head_runs_in_chunks_never_the_full_logits(topk_labels, student_config, tmp_path, monkeypatch):
    """SFTTrainer patches the model with its own fused head; the distillation loss still takes
    student-train's chunked head (head.full_logits would make [batch, positions, V])."""
    from student_train import head

    def refused(*a, **k):
        raise AssertionError("the full [batch, positions, V] logits were made")
    monkeypatch.setattr(head, "full_logits", refused)
    model, tok = student_and_tokenizer(topk_labels, student_config)
    trainer = KDSFTTrainer(model=model, args=config(tmp_path, max_steps=2, gradient_accumulation_steps=2),
                           train_dataset=LabelDataset(str(topk_labels)), processing_class=tok,
                           distill=DistillLoss(tail="target", head_chunk_mb=0.01))
    trainer.train()
    assert trainer.state.global_step == 2


def test_evaluation_reports_student_train_s_held_out_metrics(topk_labels, sampled_labels, student_config, tmp_path):
    from student_train.runtime import Dist, evaluate
    from student_train.train import score
    model, tok = student_and_tokenizer(topk_labels, student_config)
    held_out = LabelDataset(str(topk_labels), shuffle=False)
    trainer = KDSFTTrainer(model=model, args=config(tmp_path, per_device_eval_batch_size=3),
                           train_dataset=LabelDataset(str(sampled_labels)), eval_dataset=held_out,
                           processing_class=tok)
    metrics = trainer.evaluate()
    batches = list(trainer.get_eval_dataloader())
    ours = evaluate({"student": model}, score, batches, Dist(0, 1, 0, torch.device("cpu")), "float32")
    for name in ("eval_ce", "eval_kl", "eval_top1", "eval_ece"):
        assert metrics[name] == pytest.approx(ours[name], rel=1e-6), name


@pytest.mark.parametrize("option, message", [
    (dict(packing=True), "packing: label rows are teacher windows whose labels are aligned to their own positions"),
    (dict(padding_free=True), "padding_free: the label batches are padded windows"),
    (dict(completion_only_loss=True), "completion_only_loss: topk labels hold no completions"),
    (dict(assistant_only_loss=True), "does not mark the assistant's tokens (made from text, not from --messages-field"),
])
def test_sft_options_that_would_rewrite_the_stored_positions_are_refused_in_one_line(topk_labels, student_config,
                                                                                       tmp_path, option, message):
    model, tok = student_and_tokenizer(topk_labels, student_config)
    with pytest.raises(LabelgenError, match=re.escape(message)):
        KDSFTTrainer(model=model, args=config(tmp_path, **option), train_dataset=LabelDataset(str(topk_labels)),
                     processing_class=tok)


def test_assistant_only_loss_counts_the_assistant_s_tokens_of_chat_labels_as_student_train_does(
        chat_labels, student_config, tmp_path):
    model, tok = student_and_tokenizer(chat_labels, student_config)
    data, held_out = LabelDataset(str(chat_labels), shuffle=False), LabelDataset(str(chat_labels), shuffle=False)
    trainer = KDSFTTrainer(model=model, args=config(tmp_path, assistant_only_loss=True, eval_strategy="steps",
                                                    eval_steps=2, per_device_eval_batch_size=4),
                           train_dataset=data, eval_dataset=held_out, processing_class=tok, distill=DistillLoss(tail="tail"))
    mine, theirs_eval = trainer.train_dataset, trainer.eval_dataset
    assert trainer.args.assistant_only_loss and mine.stream.assistant_only and theirs_eval.stream.assistant_only
    # the caller's datasets stay as built: a second trainer without assistant_only_loss counts every position
    assert not data.stream.assistant_only and not held_out.stream.assistant_only
    plain = KDSFTTrainer(model=model, args=config(tmp_path / "plain"), train_dataset=data, processing_class=tok,
                         distill=DistillLoss(tail="tail"))
    every = plain.data_collator([e for _, e in zip(range(4), plain.train_dataset)])
    assert int(every["mask"].sum()) == int(every["attention_mask"][:, 1:].sum())
    examples = [e for _, e in zip(range(4), mine)]
    batch = trainer.data_collator(examples)
    marks = [torch.as_tensor(e["assistant_mask"][1:]) for e in examples]   # position t predicts token t + 1
    for i, m in enumerate(marks):
        assert (batch["mask"][i, :len(m)] == m).all() and not batch["mask"][i, len(m):].any()
        assert ((batch["labels"][i, 1:] != -100) == batch["mask"][i]).all()
    assert 0 < int(batch["mask"].sum()) < int(batch["attention_mask"][:, 1:].sum())
    cfg = TrainConfig(labels=(str(chat_labels),), out="unused", student_config=student_config, tail="tail",
                      assistant_only=True)
    with torch.no_grad():
        ours = micro_step({"student": model}, batch, 0.0, lambda objective: None, cfg=cfg)["loss"]
        theirs = trainer.compute_loss(model, batch)
    assert theirs.item() == pytest.approx(ours.item(), rel=1e-6, abs=1e-6)
    trainer.train()
    assert trainer.state.global_step == 2 and "eval_kl" in trainer.state.log_history[-2]


def test_a_text_dataset_is_refused_saying_what_to_pass(topk_labels, student_config, tmp_path):
    from datasets import Dataset
    model, tok = student_and_tokenizer(topk_labels, student_config)
    with pytest.raises(OptionError, match=r'train_dataset: KDSFTTrainer trains on a label set: pass '
                                          r'LabelDataset\("labels/"\) \(got Dataset\)'):
        KDSFTTrainer(model=model, args=config(tmp_path), train_dataset=Dataset.from_dict({"text": ["hi"]}),
                     processing_class=tok)


def test_a_text_eval_set_is_refused_too(topk_labels, student_config, tmp_path):
    from datasets import Dataset
    model, tok = student_and_tokenizer(topk_labels, student_config)
    with pytest.raises(OptionError, match=r"eval_dataset: held-out labels are a LabelDataset"):
        KDSFTTrainer(model=model, args=config(tmp_path), train_dataset=LabelDataset(str(topk_labels)),
                     eval_dataset={"text": Dataset.from_dict({"text": ["hi"]})}, processing_class=tok)


def test_completion_only_loss_on_completions_is_what_they_train_with_anyway(scored_labels, student_config, tmp_path):
    model, tok = student_and_tokenizer(scored_labels, student_config)
    trainer = KDSFTTrainer(model=model, args=config(tmp_path, completion_only_loss=True),
                           train_dataset=LabelDataset(str(scored_labels)), processing_class=tok,
                           distill=DistillLoss(loss="sft"))
    batch = trainer.data_collator([e for _, e in zip(range(2), LabelDataset(str(scored_labels), shuffle=False))])
    assert 0 < int(batch["mask"].sum()) < int(batch["attention_mask"][:, 1:].sum())   # prompts do not count


def doc_script(tmp_path) -> Path:
    code = DOCS.read_text().split("```python\n")[2].split("```")[0]   # the complete script (the second block)
    assert "KDSFTTrainer(model=student" in code
    path = tmp_path / "train_with_trl.py"
    path.write_text(code)
    return path


def run_script(cmd: list, ok=(0,)) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode in ok, r.stderr[-4000:]
    return r.stdout + r.stderr


def losses(out, step):
    state = json.loads((Path(out) / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_the_documented_trl_script_trains_checkpoints_and_resumes(topk_labels, student_config, tmp_path, lora):
    """docs/trl.md's script as written: 6 steps straight, and a run cut after the step-3 checkpoint resumes to the
    same losses (the label stream continues where it stopped: no position repeated or skipped)."""
    pytest.importorskip("peft")
    model, tok = student_and_tokenizer(topk_labels, student_config)
    model.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    script, flags = doc_script(tmp_path), ["--lora"] if lora else []
    run_script([sys.executable, str(script), str(topk_labels), str(tmp_path / "student"), str(tmp_path / "straight"),
                "6", *flags])
    straight = losses(tmp_path / "straight", 6)
    assert sorted(straight) == list(range(1, 7))
    if lora:
        assert (tmp_path / "straight" / "checkpoint-6" / "adapter_model.safetensors").is_file()
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    run_script([sys.executable, str(script), str(topk_labels), str(tmp_path / "student"), str(tmp_path / "resumed"),
                "6", *flags])
    resumed = losses(tmp_path / "resumed", 6)
    for s in (4, 5, 6):
        assert resumed[s] == pytest.approx(straight[s], rel=1e-4), s


@pytest.mark.slow
def test_the_documented_trl_script_trains_under_ddp_on_two_processes(topk_labels, student_config, tmp_path):
    model, tok = student_and_tokenizer(topk_labels, student_config)
    model.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    out = run_script([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29545",
                      str(doc_script(tmp_path)), str(topk_labels), str(tmp_path / "student"), str(tmp_path / "ddp"), "3"])
    state = json.loads((tmp_path / "ddp" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and all(h["loss"] > 0 for h in state["log_history"] if "loss" in h), out[-2000:]
    # Trainer keeps one RNG state per process of a distributed run: both ranks trained and checkpointed.
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoint-3").glob("rng_state*")) == ["rng_state_0.pth",
                                                                                              "rng_state_1.pth"]


@pytest.mark.slow
def test_twenty_steps_through_trl_end_where_twenty_steps_of_student_train_end(topk_labels, student_config, tmp_path):
    """The same student, labels, seed, batch and learning rate: TRL's run and student-train's run land within noise
    of each other on the held-out metrics, far from where they started."""
    import itertools
    from transformers import AutoModelForCausalLM
    from student_train.data import LabelStream, open_label_sets
    from student_train.runtime import Dist, evaluate
    from student_train.train import score, train
    steps, lr = 20, 3e-3
    train(TrainConfig(labels=(str(topk_labels),), student_config=student_config, out=str(tmp_path / "st"),
                      max_steps=steps, batch_size=4, lr=lr, warmup_steps=2, min_lr_ratio=0.0, weight_decay=0.0,
                      eval_every=0, save_every=0, log_every=1, progress=False, device="cpu", tail="target"))
    model, tok = student_and_tokenizer(topk_labels, student_config)
    before = {"student": build_model(None, student_config, tok, 0)}
    trainer = KDSFTTrainer(model=model, args=config(tmp_path / "trl", max_steps=steps, learning_rate=lr,
                                                    lr_scheduler_type="cosine", warmup_steps=2, save_strategy="no"),
                           train_dataset=LabelDataset(str(topk_labels)), processing_class=tok,
                           distill=DistillLoss(tail="target"))
    trainer.train()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "st" / f"step_{steps:06d}")
    held_out = [b for b, _ in itertools.islice(iter(LabelStream(open_label_sets([str(topk_labels)]), 8,
                                                                 shuffle=False)), 6)]
    d = Dist(0, 1, 0, torch.device("cpu"))
    start, trl_end, st_end = (evaluate(m, score, held_out, d, "float32")["eval_kl"]
                              for m in (before, {"student": model}, {"student": ours}))
    print(f"\nKL to the teacher: start {start:.3f}, TRL {trl_end:.3f}, student-train {st_end:.3f}")
    assert trl_end < 0.8 * start and st_end < 0.8 * start
    assert abs(trl_end - st_end) < 0.15 * (start - st_end)
