"""Train from label shards with `transformers.Trainer` — the trainer you
already use, with your LoRA, DeepSpeed/FSDP settings and logging.

    from student_train.hf import DistillLoss, DistillTrainer, LabelDataset
    data = LabelDataset("labels/")
    trainer = DistillTrainer(model=student, args=TrainingArguments("out", max_steps=1000,
                             remove_unused_columns=False), train_dataset=data, loss=DistillLoss(ce_weight=0.1))
    trainer.train()

`LabelDataset` streams a label set one example at a time (row groups are
read as they are needed, shuffled by (seed, epoch) as student-train's
loader does; Trainer's `set_epoch` moves it to the next epoch), so nothing
loads a whole label set. Its `collator()` pads examples into the batch
tensors student-train uses, plus `labels` so Trainer weighs accumulated
micro-batches by their counted tokens. `DistillTrainer.compute_loss` is
student-train's loss of one micro-batch (top-k KD with tail bucket, sampled
KD, CE/SFT, the CE weight, the KD temperature): the same batch gives the same
loss through both (tested). docs/trainer.md has a complete script.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from labelgen import format as fmt
from labelgen.format import FormatError
from labelgen.stopping import StopFlag
from student_train.config import LossConfig
from student_train.data import LabelStream, collate, columns_from_rows, open_label_sets
from student_train.losses import CALIBRATION_PREFIX, expected_calibration_error
from student_train.objective import check_labels, loss_step, score
from student_train.vocab import check_vocabulary, check_width_against_labels, load_tokenizer_for


DistillLoss = LossConfig
"""The loss settings of `student-train train` (loss, ce_weight, ce_weight_end,
kd_kind, tail, kd_temperature, beta, opd_forward_kl, opd_clip), for
DistillTrainer: ce_weight_at(step, max_steps) follows ce_weight_end over
Trainer's max_steps."""


class LabelDataset(torch.utils.data.IterableDataset):
    """The examples of one or more label sets (`labelgen generate` output),
    one dict of arrays each, for trainers that batch examples themselves.
    `k` keeps the first k stored entries of topk labels; `student_tokenizer`
    (a tokenizer other than the labels') turns on cross-tokenizer KD: the
    examples are re-tokenized for the student (student_train.xtok);
    `assistant_only` counts only the positions that predict an assistant's
    token (chat label sets, format 2.4). Every process
    yields the whole stream: accelerate (under Trainer) splits or
    dispatches the batches across ranks; DataLoader workers share it."""

    def __init__(self, labels: str | list[str], *, k: int | None = None, seed: int = 0, shuffle: bool = True,
                 group_units: int = 4, verify: bool = False, student_tokenizer=None, assistant_only: bool = False):
        readers = open_label_sets([labels] if isinstance(labels, str) else list(labels), verify)
        if k is not None and readers[0].kind in fmt.TOPK_KINDS and not 1 <= k <= readers[0].k:
            raise FormatError(f"k={k}: the labels hold {readers[0].k} entries per position")
        cross = None
        if student_tokenizer is not None:   # cross-tokenizer KD (student_train.xtok): a tokenizer or its directory
            from student_train.xtok import CrossTokenizer
            if isinstance(student_tokenizer, (str, Path)):
                student_tokenizer = load_tokenizer_for(None, Path(student_tokenizer), "student_tokenizer")
            cross = CrossTokenizer(load_tokenizer_for(None, readers[0].dir), student_tokenizer)
        self.stream = LabelStream(readers, 1, seed=seed, shuffle=shuffle, group_units=group_units, k=k, cross=cross,
                                  assistant_only=assistant_only)
        self.epoch = 0

    @property
    def manifest(self) -> dict:
        return self.stream.readers[0].manifest

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Examples per epoch (so Trainer can count epochs: num_train_epochs works)."""
        return sum(r.manifest["counts"]["rows"] for r in self.stream.readers)

    def fit_to(self, model, tokenizer=None, loss: LossConfig | None = None) -> None:
        """Check the labels against the student (its tokenizer, if given, must
        be the labels', or with student_tokenizer that one; its logits must
        cover the vocabulary) and the loss (objective.check_labels), and drop
        label ids beyond its logits."""
        if loss is not None:
            check_labels(loss, self.stream.readers, k=self.stream.k, cross=self.stream.cross is not None)
        width = model.get_output_embeddings().weight.shape[0]
        cross = self.stream.cross
        if cross is not None and tokenizer is not None and \
                fmt.tokenizer_fingerprint(tokenizer) != fmt.tokenizer_fingerprint(cross.student):
            raise FormatError("processing_class: not the student_tokenizer this LabelDataset re-tokenizes for")
        if cross is None and tokenizer is not None:
            width = check_vocabulary(self.manifest, tokenizer, model, str(self.stream.readers[0].dir),
                                     "build the LabelDataset with student_tokenizer=<the student's tokenizer>")
        elif cross is None:
            check_width_against_labels(self.manifest, width, str(self.stream.readers[0].dir))
        self.stream.vocab_limit = width

    def __iter__(self):
        return self.stream.rows(self.epoch)

    def copy(self) -> "LabelDataset":
        """The same label sets with settings of its own: what a trainer sets on its copy (assistant-only
        marks, the student's width) leaves the caller's dataset as it was."""
        import copy
        other = copy.copy(self)
        other.stream = copy.copy(self.stream)
        return other

    def collator(self) -> "LabelCollator":
        return LabelCollator(self)


class LabelCollator:
    """Examples of a LabelDataset -> the padded batch student-train uses
    (input_ids, attention_mask, targets, mask and the label tensors), plus
    HF-style `labels` (-100 where no position counts)."""

    def __init__(self, dataset: LabelDataset):
        self.dataset = dataset

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        s = self.dataset.stream
        columns = columns_from_rows(examples)
        batch = s.cross.collate(columns, None, s.k, s.vocab_limit, s.proposal_temperature, s.assistant_only) \
            if s.cross is not None else \
            collate(columns, s.kind, None, s.k, s.vocab_limit, s.proposal_temperature, s.assistant_only)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        labels[:, 0] = -100
        labels[:, 1:] = labels[:, 1:].masked_fill(~batch["mask"], -100)
        batch["labels"] = labels
        return batch


class _StopOnPreemption(TrainerCallback):
    """After each optimizer step: when a preemption signal reached any rank,
    save a checkpoint of this step and end training."""

    def __init__(self, trainer: "DistillTrainer"):
        self.trainer, self.flag = trainer, None

    def on_step_end(self, args, state, control, **kwargs):
        hit = torch.tensor([float(self.flag is not None and self.flag.signal is not None)], device=args.device)
        if self.trainer.accelerator.num_processes > 1:
            hit = self.trainer.accelerator.reduce(hit, "sum")   # every rank stops after the same step
        if hit.item():
            control.should_save = control.should_training_stop = True
        return control


class DistillTrainer(Trainer):
    """transformers.Trainer whose loss is student-train's (see DistillLoss).
    A LabelDataset train set is checked against the model (and its
    tokenizer, passed as processing_class) and gets its collator by default."""

    def __init__(self, *args, loss: DistillLoss = DistillLoss(), **kwargs):
        dataset = kwargs.get("train_dataset")
        if isinstance(dataset, LabelDataset) and kwargs.get("data_collator") is None:
            kwargs["data_collator"] = dataset.collator()
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False   # the label tensors are not model inputs, but the loss's
        self.distill = loss
        evals = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
        for d in (self.train_dataset, *evals):
            if isinstance(d, LabelDataset):
                d.fit_to(self.model, self.processing_class, self.distill)
        self._held_out: dict | None = None   # while evaluating: score()'s sums weighted by counted tokens
        self._preemption = _StopOnPreemption(self)
        self.add_callback(self._preemption)
        self.stopped_by: str | None = None

    def train(self, *args, **kwargs):
        """Trainer.train; a preemption signal (SIGTERM, SIGUSR1) ends it after
        the step in progress with a checkpoint of that step, and `stopped_by`
        names the signal: exit with labelgen.stopping.PREEMPTED_EXIT then, so
        a job script requeues, and resume_from_checkpoint continues."""
        with StopFlag() as flag:
            self._preemption.flag = flag
            try:
                return super().train(*args, **kwargs)
            finally:
                self._preemption.flag = None
                done = self.state.max_steps and self.state.global_step >= self.state.max_steps
                self.stopped_by = None if done else flag.signal

    def get_eval_dataloader(self, eval_dataset=None):
        """An eval LabelDataset is batched by its own collator: it may hold
        another k, kind or tokenizer than the train set."""
        ds = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else \
            eval_dataset if eval_dataset is not None else self.eval_dataset
        if not (isinstance(ds, LabelDataset) and isinstance(self.data_collator, LabelCollator)):
            return super().get_eval_dataloader(eval_dataset)
        if ds is eval_dataset:   # passed to this call: __init__ has not checked it
            ds.fit_to(self.model, self.processing_class, self.distill)
        train_collator, self.data_collator = self.data_collator, ds.collator()
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def evaluation_loop(self, *args, **kwargs):
        """Trainer's evaluation (eval_loss: the training objective), plus
        student-train's held-out metrics over the same batches, averaged over
        the counted positions of every rank: eval_ce (CE on the actual next
        tokens), for top-k labels eval_kl (KL(teacher || student) over the
        top-k plus the tail bucket) and eval_top1 (agreement with the
        teacher's top-1), and eval_ece (expected calibration error of the
        student's top-1, 15 bins)."""
        self._held_out = {}
        try:
            output = super().evaluation_loop(*args, **kwargs)
            names = sorted(self._held_out)
            sums = torch.stack([self._held_out[k] for k in names]).to(self.args.device) if names else None
            sums = self.accelerator.reduce(sums, "sum").tolist() if names else []   # every rank's
        finally:
            self._held_out = None
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        means = {k: v / max(dict(zip(names, sums))["tokens"], 1) for k, v in zip(names, sums) if k != "tokens"}
        gaps = [means.pop(k) for k in sorted(means) if k.startswith(CALIBRATION_PREFIX)]
        output.metrics.update({f"{prefix}_{k}": v for k, v in means.items()})
        if gaps:
            output.metrics[f"{prefix}_ece"] = expected_calibration_error(gaps)
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._held_out is not None:   # evaluating: student-train's held-out score of this batch too
            with torch.no_grad():
                held = score({"student": model}, inputs, head_chunk_mb=self.distill.head_chunk_mb)
            tokens = inputs["mask"].sum().double()
            for k, v in {**held, "tokens": torch.ones(())}.items():
                self._held_out[k] = self._held_out.get(k, 0) + torch.as_tensor(v).detach().double().cpu() * tokens.cpu()
        alpha = self.distill.ce_weight_at(self.state.global_step, self.state.max_steps)
        out = loss_step(model, inputs, self.distill, alpha)
        loss, ce, kd = out["objective"], out["ce"], out["kd"]
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            # Trainer then treats the loss as scaled for accumulation: weigh
            # this micro-batch by its counted tokens over all of the step's.
            # A micro-batch with no position to count (a window without an assistant token) contributes nothing:
            # 0, not 0 * 0 / 0 = NaN in every weight after the step.
            loss = loss * inputs["mask"].sum() / torch.as_tensor(num_items_in_batch).clamp(min=1)
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        return (loss, {"ce": ce.detach(), "kd": kd.detach()}) if return_outputs else loss
