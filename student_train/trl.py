"""Train from label shards inside TRL: `SFTTrainer` with a label set as its
dataset and student-train's distillation loss as its loss.

    from trl import SFTConfig
    from student_train.trl import DistillLoss, KDSFTTrainer, LabelDataset
    trainer = KDSFTTrainer(model="student/", args=SFTConfig("out", max_steps=1000),
                           train_dataset=LabelDataset("labels/"), distill=DistillLoss(ce_weight=0.1),
                           peft_config=LoraConfig(...))
    trainer.train()

A TRL user's script changes in three places: the trainer's class, the
dataset (a LabelDataset instead of text) and `distill=` (the loss:
top-k KD with its tail modes, sampled KD, CE or SFT, the CE weight, the KD
temperature; docs/training.md). Everything else is SFTTrainer's: SFTConfig,
the model given by name or object, `peft_config`, logging, checkpoints and
`resume_from_checkpoint` (the label stream continues where it stopped),
DDP under `accelerate launch` or torchrun. What SFTTrainer does to a text
dataset it does not do here (docs/trl.md): the stored token ids are the
labels' positions, so its tokenizing, truncation (`max_length`) and chat
templating are skipped, and what would change them is refused in one line:
`packing`, `padding_free`, `completion_only_loss` on labels that hold no
completions. `assistant_only_loss` counts only the positions that predict
an assistant's token, as marked in chat label sets (format 2.4; labels
without the marks are refused in one line). The loss, its eval metrics (eval_ce, eval_kl,
eval_top1, eval_ece) and preemption handling are DistillTrainer's (hf.py):
the same batch gives the same loss through `student-train`, Trainer and TRL.
"""

from __future__ import annotations

import copy

from trl import SFTConfig, SFTTrainer

from labelgen import format as fmt
from labelgen.errors import OptionError
from student_train.hf import DistillLoss, DistillTrainer, LabelDataset

__all__ = ["DistillLoss", "KDSFTTrainer", "LabelDataset"]


def _placeholder():
    """A one-row datasets.Dataset of token ids: SFTTrainer's constructor accepts only a `datasets` dataset, and
    with skip_prepare_dataset it reads one example of it (to tell text from images). The LabelDataset replaces it
    before anything trains or evaluates."""
    from datasets import Dataset
    return Dataset.from_dict({"input_ids": [[0, 1]]})


class KDSFTTrainer(DistillTrainer, SFTTrainer):
    """TRL's SFTTrainer whose dataset is a LabelDataset and whose loss is
    student-train's (`distill`, a DistillLoss). Eval datasets may be
    LabelDatasets too (a dict of them for several)."""

    def __init__(self, model, args: SFTConfig | None = None, train_dataset: LabelDataset | None = None,
                 eval_dataset=None, *, distill: DistillLoss = DistillLoss(), **kwargs):
        if not isinstance(train_dataset, LabelDataset):
            raise OptionError("train_dataset: KDSFTTrainer trains on a label set: pass LabelDataset(\"labels/\") "
                              f"(got {type(train_dataset).__name__})")
        evals = eval_dataset.values() if isinstance(eval_dataset, dict) else [] if eval_dataset is None else [eval_dataset]
        if any(not isinstance(d, LabelDataset) for d in evals):
            raise OptionError("eval_dataset: held-out labels are a LabelDataset (or a dict of them), batched and scored "
                              "as the training labels are")
        # The trainer's own copies: assistant_only_loss switches their marks on, not the caller's datasets'.
        train_dataset = train_dataset.copy()
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: d.copy() for name, d in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = eval_dataset.copy()
        evals = eval_dataset.values() if isinstance(eval_dataset, dict) else [] if eval_dataset is None else [eval_dataset]
        args = _fit_config(args if args is not None else SFTConfig("kd-sft"), train_dataset, list(evals))
        kwargs.setdefault("data_collator", train_dataset.collator())
        super().__init__(model, args, train_dataset=_placeholder(), eval_dataset=eval_dataset, loss=distill, **kwargs)
        self.train_dataset = train_dataset
        train_dataset.fit_to(self.model, self.processing_class, self.distill)
        # Off while SFTTrainer was built (it would prepare a conversational dataset); what holds is said again.
        self.args.assistant_only_loss = train_dataset.stream.assistant_only

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """DistillTrainer's loss; in training its parts logged as TRL logs its
        own (ce and kd per counted position, num_tokens). Evaluation reports
        DistillTrainer's held-out metrics, weighted by counted positions (an
        SFTTrainer metric of the same name would replace them with a plain
        mean over batches)."""
        loss, parts = super().compute_loss(model, inputs, True, num_items_in_batch)
        if self.model.training:
            for name, value in parts.items():
                self._metrics["train"][name].append(self.accelerator.gather_for_metrics(value.reshape(1)).mean().item())
            self._total_train_tokens += self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return (loss, parts) if return_outputs else loss


def _fit_config(args: SFTConfig, data: LabelDataset, evals: list[LabelDataset]) -> SFTConfig:
    """`args` with what would rewrite the stored ids turned off, refusing
    what cannot hold on label rows (one line each, naming the option);
    assistant_only_loss is handed to the label sets (their assistant marks
    decide which positions count, in training and evaluation)."""
    if not isinstance(args, SFTConfig):   # TrainingArguments: as SFTTrainer converts them
        args = SFTConfig(**{**args.to_dict(), "hub_token": args.hub_token})
    else:   # the caller's config stays as written (it may build a plain SFTTrainer next)
        args = copy.copy(args)
    kind = data.stream.kind
    if args.packing or args.eval_packing:
        raise OptionError("packing: label rows are teacher windows whose labels are aligned to their own positions; "
                          "packing is not offered: leave packing=False")
    if args.padding_free:
        raise OptionError("padding_free: the label batches are padded windows with their label tensors; leave "
                          "padding_free=False")
    if args.completion_only_loss and kind not in fmt.COMPLETION_KINDS:
        raise OptionError(f"completion_only_loss: {kind} labels hold no completions (only samples and scored labels "
                          "do, whose loss counts their completion tokens already); for labels of chat text, "
                          "assistant_only_loss=True counts the assistant's tokens only")
    if args.assistant_only_loss:   # the label sets' marks decide (SFTTrainer's own would want messages and a template)
        for d in (data, *evals):
            d.stream.set_assistant_only(True, "assistant_only_loss")
        args.assistant_only_loss = False
    args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}   # the ids stay as stored
    args.remove_unused_columns = False   # the label tensors are the loss's inputs, not the model's
    args.completion_only_loss = False    # the collator's mask decides what counts
    return args
