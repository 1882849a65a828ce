"""The settings of `student-train train` (TrainConfig) and `codistill`
(CodistillConfig), each with its default, in one place; the loop's own
settings are one shared LoopConfig. The CLI and YAML/JSON config files only
fill them in; the resolved config is written into every checkpoint's
meta.json."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from labelgen.errors import OptionError
from labelgen.settings import config_from_sources
from student_train.losses import KD_KINDS, TAILS, check_tail, ramp

DTYPES = ("auto", "float32", "bfloat16")
LOSSES = ("kd", "ce", "sft", "opd")
CE_WEIGHT_SCHEDULES = ("linear", "cosine")
KD_SUPPORTS = ("full", "topk")
# Settings renamed so that one name means one thing in both command lines (--temperature samples in
# `labelgen generate`, --num-workers are generate's data-parallel workers, and Axolotl's kd_alpha weighs KD
# where our alpha weighed CE). The old names are read, with a one-line note, until the next release.
RENAMED = {"temperature": "kd_temperature", "alpha": "ce_weight", "alpha_end": "ce_weight_end",
           "alpha_warmup_steps": "ce_weight_warmup_steps", "alpha_ramp_steps": "ce_weight_ramp_steps",
           "alpha_schedule": "ce_weight_schedule", "num_workers": "loader_workers"}


def renamed_for(cls) -> dict[str, str]:
    """The old names of config class `cls`'s settings (RENAMED, where `cls` has the new name)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {old: new for old, new in RENAMED.items() if new in names}
# The forward-KL weight beside on-policy distillation's policy gradient. On SmolLM2-135M-Instruct's pruned
# student (docs/results.md, on-policy rounds) the reverse-KL gradient alone ended lower in held-out reverse KL
# than with forward KL at weight 1 (1.34 vs 1.41 after 4 rounds, 1.33 vs 1.40 over rounds 2-4), and higher in
# the teacher's logprob.
OPD_FORWARD_KL = 0.0


def _bad(option, msg):
    raise OptionError(f"{option}: {msg}")


@dataclass(frozen=True, kw_only=True)
class KDConfig:
    """How the student's outputs are made and compared with the teacher's, in every command."""
    kd_kind: str = "forward"
    """forward KL(teacher||student), reverse KL, or jsd."""
    tail: str | None = None
    """tail: top-k plus one bucket for the missing mass (also pins the student's
    total mass on the top-k); renorm: renormalised top-k only; target: the
    missing mass given to the actual next token (student_train.losses).
    Sampled labels: tail is the drawn ids plus a bucket for the teacher's
    mass outside them (sets made with --encoding sampled_coverage=true).
    None: tail for top-k labels, the unbiased estimator (cross-entropy on the
    draws) for sampled labels."""
    kd_temperature: float = 1.0
    """KD at temperature T: both distributions softened by T, the loss scaled by T^2 (--tail renorm or
    sampled labels; the tail supports need T = 1)."""
    beta: float = 0.5
    """JSD mixing weight."""
    head_chunk_mb: float | None = None
    """MiB of fp32 logits the student's LM head makes at a time: the head and
    every loss run a chunk of positions at a time, forward and backward, so
    [batch, positions, vocabulary] logits never exist (student_train/head.py).
    None: head.CHUNK_MB for the device; 0: the model's own logits, every
    position at once (the path before chunking)."""

    @property
    def topk_tail(self) -> str:
        """The support of top-k KD."""
        return self.tail or "tail"

    @property
    def topk_support(self) -> bool:
        """KD compares the student with a top-k (so --tail applies)."""
        return True

    # The labels' kind is known only when they are opened (train.check_loss_fits_labels): a sampled set's
    # default loss (the estimator) takes any temperature, a top-k set's default support (tail) only T = 1.
    labels_decide_tail = False

    def __post_init__(self):
        if self.kd_kind not in KD_KINDS:
            _bad("--kd-kind", f"must be one of {', '.join(KD_KINDS)}, got {self.kd_kind!r}")
        if self.kd_temperature <= 0:
            _bad("--kd-temperature", f"must be > 0, got {self.kd_temperature}")
        if self.tail is not None and self.tail not in TAILS:
            _bad("--tail", f"must be one of {', '.join(TAILS)}, got {self.tail!r}")
        known = self.tail is not None or not self.labels_decide_tail
        if self.topk_support and known and (problem := check_tail(self.topk_tail, self.kd_kind, self.kd_temperature,
                                                                       self.tail is not None)):
            _bad(*problem)
        if not 0 <= self.beta <= 1:
            _bad("--beta", f"must be in [0, 1], got {self.beta}")
        if self.head_chunk_mb is not None and not (math.isfinite(self.head_chunk_mb) and self.head_chunk_mb >= 0):
            _bad("--head-chunk-mb", f"must be >= 0 (0: the model's full logits), got {self.head_chunk_mb}")


@dataclass(frozen=True, kw_only=True)
class LossConfig(KDConfig):
    """The loss of one micro-batch (student_train.objective), with one default
    and one check each: `student-train train` and `rounds` take these
    settings, and DistillLoss (transformers.Trainer) is this class."""
    labels_decide_tail = True
    loss: str = "kd"
    """kd: ce_weight*CE + (1-ce_weight)*KD (topk, sampled or scored labels). ce:
    CE on the actual tokens (topk or tokens labels). sft: CE on completions,
    prompt masked (samples or scored labels). opd: on-policy distillation on
    the student's own scored completions (scored labels): the per-token
    reverse-KL policy gradient plus opd_forward_kl x forward KL on the
    teacher's top-k."""
    ce_weight: float = 0.0
    """Weight of CE on the actual tokens in the kd loss: ce_weight*CE + (1-ce_weight)*KD. Axolotl's kd_alpha
    and DistillKit's alpha weigh the KD term: their 0.9 is this 0.1 (docs/training.md)."""
    ce_weight_end: float | None = None
    """If set, ce_weight moves linearly to this value over the run."""
    opd_forward_kl: float = OPD_FORWARD_KL
    """opd: weight of the forward KL on the teacher's top-k + tail beside the reverse-KL policy gradient."""
    opd_clip: float = 0.2
    """opd: the importance ratio against the sampling-time logprob is clipped to [1 - clip, 1 + clip]."""

    def __post_init__(self):
        super().__post_init__()
        if self.loss not in LOSSES:
            _bad("--loss", f"must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        for name in ("ce_weight", "ce_weight_end"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 1:
                _bad(f"--{name.replace('_', '-')}", f"must be in [0, 1], got {v}")
        if self.opd_forward_kl < 0:
            _bad("--opd-forward-kl", f"must be >= 0, got {self.opd_forward_kl}")
        if not 0 < self.opd_clip < 1:
            _bad("--opd-clip", f"must be in (0, 1), got {self.opd_clip}")

    def ce_weight_at(self, step: int, max_steps: int = 0) -> float:
        """CE weight at `step` of a run of `max_steps` (0: unknown, it stays): 1 for ce/sft, 0 for opd (CE
        is only measured); for kd ce_weight, or linear to ce_weight_end over the run."""
        if self.loss != "kd":
            return 0.0 if self.loss == "opd" else 1.0
        return ramp(step, self.ce_weight, self.ce_weight_end if max_steps > 1 else None, 0, max_steps - 1)


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """The settings of the training loop (`runtime.fit`) that every command
    shares, with one default and one check each."""
    max_steps: int = 1000
    """Optimizer steps, each over grad_accum micro-batches."""
    batch_size: int = 8
    """Rows per micro-batch per rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step, weighted by their counted tokens."""
    warmup_steps: int = 50
    """Optimizer steps of linear LR warmup."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    group_units: int = 4
    """Row groups shuffled together: the shuffle buffer, in row groups."""
    loader_workers: int = 0
    """DataLoader worker processes per rank (label reading and collation beside the training loop)."""
    dtype: str = "auto"
    """auto: bf16 autocast on GPU, fp32 on CPU."""
    device: str = "auto"
    fsdp: bool = False
    """Shard the trained models with FSDP (for models that do not fit one GPU)."""
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        super().__post_init__()

        def bad(option, msg):
            raise OptionError(f"{option}: {msg}")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_batches", "log_every", "group_units"):
            if getattr(self, name) < 1:
                bad(f"--{name.replace('_', '-')}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "warmup_steps", "loader_workers"):
            if getattr(self, name) < 0:
                bad(f"--{name.replace('_', '-')}", f"must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("--min-lr-ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            bad("--weight-decay", f"must be >= 0, got {self.weight_decay}")
        if self.grad_clip < 0:
            bad("--grad-clip", f"must be >= 0 (0: no clipping), got {self.grad_clip}")
        if self.dtype not in DTYPES:
            bad("--dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.resume and self.overwrite:
            bad("--resume/--overwrite", "pass one, not both")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(LoopConfig, LossConfig):
    labels: tuple[str, ...]
    """Label directories to train on (written by `labelgen generate`)."""
    out: str
    """Run directory: metrics.jsonl and step_NNNNNN/ checkpoints."""
    student: str | None = None
    """HF model directory to start from."""
    student_config: str | None = None
    """HF config JSON to build a student from scratch (uses the labels' tokenizer)."""
    student_tokenizer: str | None = None
    """A tokenizer directory different from the labels' (cross-tokenizer KD):
    the student learns on its own tokenization of the labelled text, with KD
    where both tokenizations share a token boundary (docs/training.md)."""
    eval_labels: tuple[str, ...] = ()
    """Held-out label directories for evaluation."""
    eval_holdout: int = 0
    """Or hold out this many shards at the end of --labels for evaluation."""
    k: int | None = None
    """Use the first k stored entries (default: all the labels hold)."""
    assistant_only: bool = False
    """Train and evaluate on the assistant's tokens only: a position counts
    when the token it predicts belongs to an assistant turn (label sets
    generated with --messages-field mark them, format 2.4; TRL calls this
    assistant_only_loss). samples and scored labels count their completions
    only, always."""
    lr: float = 3e-4
    verify: bool = False
    """Check every shard's sha256 before training (sizes are always checked)."""

    def __post_init__(self):
        super().__post_init__()
        if not self.labels:
            _bad("--labels", "at least one label directory is required")
        if (self.student is None) == (self.student_config is None):
            _bad("--student/--student-config", "pass exactly one")
        if self.k is not None and self.k < 1:
            _bad("--k", f"must be >= 1, got {self.k}")
        if self.eval_holdout < 0:
            _bad("--eval-holdout", f"must be >= 0, got {self.eval_holdout}")
        if self.lr <= 0:
            _bad("--lr", f"must be > 0, got {self.lr}")
        if self.eval_labels and self.eval_holdout:
            _bad("--eval-labels/--eval-holdout", "pass one, not both")

    def ce_weight_at(self, step: int, max_steps: int | None = None) -> float:
        return super().ce_weight_at(step, self.max_steps if max_steps is None else max_steps)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["labels"], d["eval_labels"] = list(self.labels), list(self.eval_labels)
        return d

    @classmethod
    def from_sources(cls, config_file: str | None, overrides: dict) -> "TrainConfig":
        return config_from_sources(cls, config_file, overrides, tuple_fields=("labels", "eval_labels"),
                                   renamed=renamed_for(cls))


@dataclass(frozen=True, kw_only=True)
class CodistillConfig(LoopConfig, KDConfig):
    inputs: tuple[str, ...]
    """Raw text (the inputs `labelgen generate` reads), tokenized with the shared tokenizer."""
    out: str
    """Run directory: data/ (the tokenized corpus), metrics.jsonl, step_NNNNNN/."""
    teacher: str | None = None
    teacher_config: str | None = None
    """HF config JSON: the teacher starts untrained."""
    student: str | None = None
    student_config: str | None = None
    tokenizer: str | None = None
    """Tokenizer directory (needed when neither model directory has one)."""
    eval_input: tuple[str, ...] = ()
    """Held-out raw text for evaluation."""
    text_field: str = "text"
    max_seq_len: int = 256
    rows_per_shard: int = 1000
    ce_weight: float = 0.5
    """Target weight of CE in the student's loss ce_weight*CE + (1-ce_weight)*KD."""
    ce_weight_warmup_steps: int = 0
    """ce_weight = 1 for these first steps (the teacher's labels are noise early)."""
    ce_weight_ramp_steps: int = 0
    """Then ce_weight moves from 1 to --ce-weight over these steps."""
    ce_weight_schedule: str = "linear"
    kd: str = "full"
    """full: KD against the teacher's whole distribution. topk: only its top-k
    (comparable with offline labels of that k)."""
    k: int = 64
    teacher_lr: float = 3e-4
    """0 freezes the teacher."""
    student_lr: float = 3e-4

    @property
    def topk_support(self) -> bool:
        return self.kd == "topk"

    def __post_init__(self):
        super().__post_init__()

        def bad(option, msg):
            raise OptionError(f"{option}: {msg}")
        if not self.inputs:
            bad("--input", "at least one input file or directory is required")
        if (self.teacher is None) == (self.teacher_config is None):
            bad("--teacher/--teacher-config", "pass exactly one")
        if (self.student is None) == (self.student_config is None):
            bad("--student/--student-config", "pass exactly one")
        if self.teacher is None and self.student is None and self.tokenizer is None:
            bad("--tokenizer", "required when both models are built from configs")
        if not 0 <= self.ce_weight <= 1:
            bad("--ce-weight", f"must be in [0, 1], got {self.ce_weight}")
        if self.ce_weight_warmup_steps < 0 or self.ce_weight_ramp_steps < 0:
            bad("--ce-weight-warmup-steps/--ce-weight-ramp-steps", "must be >= 0")
        if self.ce_weight_warmup_steps + self.ce_weight_ramp_steps > self.max_steps:
            bad("--ce-weight-warmup-steps", f"the CE weight's schedule ({self.ce_weight_warmup_steps} + "
                                            f"{self.ce_weight_ramp_steps} steps) "
                                        f"is longer than the run (--max-steps {self.max_steps})")
        if self.ce_weight_schedule not in CE_WEIGHT_SCHEDULES:
            bad("--ce-weight-schedule", f"must be one of {', '.join(CE_WEIGHT_SCHEDULES)}")
        if self.kd not in KD_SUPPORTS:
            bad("--kd", f"must be one of {', '.join(KD_SUPPORTS)}")
        for name in ("k", "max_seq_len", "rows_per_shard"):
            if getattr(self, name) < 1:
                bad(f"--{name.replace('_', '-')}", f"must be >= 1, got {getattr(self, name)}")
        if self.teacher_lr < 0 or self.student_lr <= 0:
            bad("--teacher-lr/--student-lr", "the student's must be > 0, the teacher's >= 0 (0 freezes it)")

    def ce_weight_at(self, step: int) -> float:
        """CE weight at `step`: 1 for ce_weight_warmup_steps, then linear or cosine to ce_weight over
        ce_weight_ramp_steps."""
        return ramp(step, 1.0, self.ce_weight, self.ce_weight_warmup_steps, self.ce_weight_ramp_steps,
                    self.ce_weight_schedule)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["inputs"], d["eval_input"] = list(self.inputs), list(self.eval_input)
        return d

    @classmethod
    def from_sources(cls, config_file: str | None, overrides: dict) -> "CodistillConfig":
        return config_from_sources(cls, config_file, overrides, tuple_fields=("inputs", "eval_input"),
                                   renamed=renamed_for(cls))


SAMPLERS = ("student", "teacher")
ROUND_LOSSES = ("opd", "kd", "sft")


@dataclass(frozen=True, kw_only=True)
class RoundsConfig(LoopConfig, LossConfig):
    """`student-train rounds`: on-policy distillation in batch rounds. Each
    round the sampler writes `n` completions per prompt (temperature 1), the
    teacher scores them offline (`labelgen generate --mode score`), and the
    student trains `max_steps` optimizer steps on them; the next round
    samples from the student it ends with. Every stage is cached in `out`:
    the same command run again continues where it stopped."""
    teacher: str
    """HF teacher directory: it scores every completion (top-k at the completion tokens)."""
    student: str
    """HF student directory the first round samples from and trains."""
    prompts: tuple[str, ...]
    """Prompt files (JSONL with --prompt-field or --messages-field), as `labelgen generate --mode sample` reads them."""
    out: str
    """Work directory: round-NNN/{samples,scored,train}/, rounds.jsonl."""
    eval_prompts: tuple[str, ...] = ()
    """Held-out prompts: after every round (and before the first) the student's completions of them are
    scored by the teacher: its on-policy reverse KL and the teacher's logprob of what it writes."""
    rounds: int = 4
    sampler: str = "student"
    """student: on-policy (the current student writes). teacher: the teacher writes (an off-policy
    baseline with the same loop, prompts and token counts)."""
    loss: str = "opd"
    """opd (the student's own samples only), kd (forward KL on the teacher's top-k at the completion
    tokens) or sft (CE on the completions; they are not scored)."""
    n: int = 4
    """Completions per prompt per round."""
    eval_n: int = 1
    max_new_tokens: int = 128
    k: int = 64
    """Top-k the teacher keeps per completion token."""
    prompt_field: str | None = None
    """The prompt's field in the prompt files (default "prompt"), or:"""
    messages_field: str | None = None
    id_field: str | None = None
    lr: float = 5e-5
    """The student is fine-tuned from a trained model: lower than `train`'s from-scratch default
    (docs/results.md used 1e-4 for a 71M student)."""
    backend: str = "hf"
    """Generation backend for sampling and scoring: hf or vllm."""
    batch_tokens: int = 16384
    """Padded tokens per generation batch (hf backend)."""
    skip_bad: bool = False
    """Skip bad prompt records (counted in each samples set's manifest) instead of failing."""
    # Each round's training starts a fresh optimizer: no warmup, a constant LR by default.
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0
    max_steps: int = 50
    """Optimizer steps per round."""
    save_every: int = 0
    eval_every: int = 0

    def __post_init__(self):
        def bad(option, msg):
            raise OptionError(f"{option}: {msg}")
        if self.loss not in ROUND_LOSSES:
            bad("--loss", f"must be one of {', '.join(ROUND_LOSSES)}, got {self.loss!r}")
        super().__post_init__()
        if not self.prompts:
            bad("--prompts", "at least one prompt file is required")
        if self.sampler not in SAMPLERS:
            bad("--sampler", f"must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.loss == "opd" and self.sampler != "student":
            bad("--loss", "opd learns from the student's own completions (--sampler student)")
        for name in ("rounds", "n", "eval_n", "max_new_tokens", "k", "batch_tokens"):
            if getattr(self, name) < 1:
                bad(f"--{name.replace('_', '-')}", f"must be >= 1, got {getattr(self, name)}")
        if self.prompt_field and self.messages_field:
            bad("--prompt-field/--messages-field", "pass one, not both")
        if self.backend not in ("hf", "vllm"):
            bad("--backend", f"must be hf or vllm, got {self.backend!r}")
        self.train_config(labels="-", student=self.student, out="-")   # the training settings, checked now

    def train_config(self, labels: str, student: str, out: str) -> TrainConfig:
        """One round's `student-train train` settings: every loop setting, this loss, resumed if cut."""
        shared = {f.name: getattr(self, f.name) for f in (*dataclasses.fields(LoopConfig), *dataclasses.fields(LossConfig))}
        shared.update(resume=True, overwrite=False, eval_every=0)
        return TrainConfig(**shared, labels=(labels,), out=out, student=student, lr=self.lr)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["prompts"], d["eval_prompts"] = list(self.prompts), list(self.eval_prompts)
        return d

    @classmethod
    def from_sources(cls, config_file: str | None, overrides: dict) -> "RoundsConfig":
        return config_from_sources(cls, config_file, overrides, tuple_fields=("prompts", "eval_prompts"),
                                   renamed=renamed_for(cls))
