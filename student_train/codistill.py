"""Co-distillation: `student-train codistill --input corpus/ ...` trains a
teacher and a student together on the same batches.

Each micro-batch runs the teacher once: its CE on the actual tokens trains
it, and its logits from that same forward (detached) are the student's soft
labels. The student's loss is alpha(t)*CE + (1 - alpha(t))*KD, with
alpha(t) = 1 for the first steps (an untrained teacher's labels are noise)
and then a ramp to the target alpha. The corpus is tokenized once into
OUT/data as a `tokens` label set and streamed by the training stage's
loader; the loop, checkpoints and distributed setup are the training
stage's (`runtime.fit`), with two models instead of one.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
import torch.distributed as dist

from labelgen import format as fmt
from labelgen.errors import OptionError
from labelgen.format import FormatError
from student_train import head, losses
from student_train.config import CodistillConfig
from student_train.data import LabelStream, open_label_sets
from student_train.objective import mix
from student_train.runtime import Run, build_model, fit, run_dir, setup_distributed, training_run

DATA, EVAL_DATA = "data", "eval_data"   # the tokenized corpus (a tokens label set) and its held-out part
CODISTILL = training_run("co-distillation run", DATA, EVAL_DATA)


def shared_tokenizer(cfg: CodistillConfig):
    """The one tokenizer both models use; refuse models whose tokenizers differ."""
    from transformers import AutoTokenizer
    found = {}
    for name, where in (("--tokenizer", cfg.tokenizer), ("--teacher", cfg.teacher), ("--student", cfg.student)):
        if where and any((Path(where) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            found[name] = (where, AutoTokenizer.from_pretrained(where, trust_remote_code=False))
    if not found:
        raise OptionError("--tokenizer: no tokenizer found; pass --tokenizer DIR")
    (first, (path, tok)), *others = found.items()
    fp = fmt.tokenizer_fingerprint(tok)
    for name, (other_path, other) in others:
        ofp = fmt.tokenizer_fingerprint(other)
        if ofp["fingerprint"] != fp["fingerprint"]:
            raise OptionError(f"{name} {other_path} and {first} {path} have different tokenizers "
                             f"(differ in: {fmt.tokenizer_difference(fp, ofp)})")
    return path, tok


def tokenize_corpus(inputs: tuple[str, ...], out: Path, tokenizer_dir: str, cfg: CodistillConfig) -> Path:
    """Tokenize raw text into a `tokens` label set once; later runs reuse it."""
    from labelgen.generate.config import GenerateConfig
    from labelgen.generate import run
    if not (out / fmt.MANIFEST_NAME).is_file():
        run(GenerateConfig(teacher=tokenizer_dir, inputs=tuple(inputs), out=str(out), mode="tokens",
                           max_seq_len=cfg.max_seq_len, batch_tokens=max(16384, cfg.max_seq_len),
                           rows_per_shard=cfg.rows_per_shard, text_field=cfg.text_field, progress=False,
                           overwrite=True))
    return out


def check_widths(teacher, student, tokenizer) -> int:
    """KD compares the first len(tokenizer) logits: padded slots beyond the
    tokenizer hold no token. Both models must be at least that wide."""
    n = len(tokenizer)
    for name, model in (("teacher", teacher), ("student", student)):
        width = model.get_output_embeddings().weight.shape[0]
        if width < n:
            raise OptionError(f"--{name}: its logits are {width} wide but the shared tokenizer has {n} tokens")
    return n


def kd_terms(s_logits: torch.Tensor, t_logits: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
             cfg: CodistillConfig) -> torch.Tensor:
    """Per position: the training stage's losses against the teacher's live
    distribution, all of it (full) or its top-k only (as offline labels would keep)."""
    if cfg.kd == "full":
        return losses.full_kd_terms(s_logits, t_logits, mask, kind=cfg.kd_kind, temperature=cfg.kd_temperature,
                                    beta=cfg.beta)
    t_lp = torch.log_softmax(t_logits.float(), dim=-1)
    top = t_lp.topk(cfg.k, dim=-1)
    return losses.topk_kd_terms(s_logits, top.indices, top.values, top.values.exp().sum(-1), mask, kind=cfg.kd_kind,
                                tail=cfg.topk_tail, temperature=cfg.kd_temperature, beta=cfg.beta, targets=targets)


def teacher_pass(teacher, batch: dict, cfg: CodistillConfig, n_vocab: int) -> tuple[dict, dict]:
    """The teacher's CE ("objective") and what makes its logits again, chunk
    by chunk, for the student (head.run keep=True); and the student's batch:
    `batch` with those rows added."""
    n = batch["mask"].sum().clamp(min=1)
    kept = head.run(teacher, batch, functools.partial(ce_terms, n=n), cfg.head_chunk_mb, n_vocab, keep=True)
    rows = {f"teacher_{key}": kept[key] for key in ("hidden", "logits") if key in kept}
    return kept, {**batch, **rows}


def ce_terms(z: torch.Tensor, rows: dict, *, n: torch.Tensor) -> dict:
    ce = losses.cross_entropy_terms(z, rows["targets"], rows["mask"]).sum() / n
    return {"objective": ce}


def student_terms(z: torch.Tensor, rows: dict, *, teacher: dict, cfg: CodistillConfig, alpha: float,
                  n: torch.Tensor, held_out: bool = False) -> dict:
    """The student's CE and KD on the logits z of some positions, against the
    teacher's logits there (sums / n); held out: CE, the full forward KL and
    the calibration bins instead."""
    t_logits = head.logits_of(rows, "teacher_", teacher)
    mask, targets = rows["mask"], rows["targets"]
    lse = losses.logsumexp_chunked(z)
    ce = losses.cross_entropy_terms(z, targets, mask, lse=lse).sum() / n
    if held_out:
        return {"objective": ce, "ce": ce, "kl": losses.full_kd_terms(z, t_logits, mask).sum() / n,
                "calibration": losses.calibration_sums(z, targets, mask, lse) / n}
    kd = kd_terms(z, t_logits, mask, targets, cfg).sum() / n if alpha < 1 else torch.zeros_like(ce)
    return {"objective": mix(ce, kd, alpha), "ce": ce, "kd": kd}


def micro_step(models: dict, batch: dict, alpha: float, backward, *, cfg: CodistillConfig, n_vocab: int) -> dict:
    """One batch: the teacher's CE, back-propagated before the student runs
    (its activations are freed), then the student's loss against the same
    teacher logits, detached. A teacher with teacher_lr 0 is frozen: no
    gradient, no backward."""
    frozen = cfg.teacher_lr == 0
    with torch.no_grad() if frozen else contextlib.nullcontext():
        teacher, rows = teacher_pass(models["teacher"], batch, cfg, n_vocab)
        if not frozen:
            backward(teacher["objective"])
    n = batch["mask"].sum().clamp(min=1)
    out = head.run(models["student"], rows, functools.partial(student_terms, teacher=teacher, cfg=cfg, alpha=alpha, n=n),
                   cfg.head_chunk_mb, n_vocab)
    backward(out["objective"])
    return {"loss": out["objective"], "ce": out["ce"], "kd": out["kd"], "teacher_ce": teacher["objective"]}


def score(models: dict, batch: dict, *, cfg: CodistillConfig, n_vocab: int) -> dict:
    """Held-out: the student's CE and KL(teacher || student), the teacher's CE."""
    teacher, rows = teacher_pass(models["teacher"], batch, cfg, n_vocab)
    n = batch["mask"].sum().clamp(min=1)
    out = head.run(models["student"], rows, functools.partial(student_terms, teacher=teacher, cfg=cfg, alpha=1.0, n=n,
                                                              held_out=True), cfg.head_chunk_mb, n_vocab)
    return {"ce": out["ce"], "kl": out["kl"], "teacher_ce": teacher["objective"],
            **losses.calibration_metrics(out["calibration"])}


def codistill(cfg: CodistillConfig) -> dict:
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    d = setup_distributed(cfg.device)
    tok_dir, tokenizer = shared_tokenizer(cfg)
    teacher = build_model(cfg.teacher, cfg.teacher_config, tokenizer, cfg.seed + 1)
    student = build_model(cfg.student, cfg.student_config, tokenizer, cfg.seed)
    n_vocab = check_widths(teacher, student, tokenizer)
    with run_dir(cfg, d, CODISTILL) as (rd, ckpt):
        out = rd.local
        if d.main:
            tokenize_corpus(cfg.inputs, out / DATA, tok_dir, cfg)
            if cfg.eval_input:
                tokenize_corpus(cfg.eval_input, out / EVAL_DATA, tok_dir, cfg)
        if dist.is_initialized():
            dist.barrier()
        readers = open_label_sets([str(out / DATA)])
        stream = LabelStream(readers, cfg.batch_size, seed=cfg.seed, group_units=cfg.group_units, rank=d.rank,
                             world_size=d.world)
        eval_stream = None
        if cfg.eval_input:
            eval_stream = LabelStream(open_label_sets([str(out / EVAL_DATA)]), cfg.batch_size, shuffle=False,
                                      rank=d.rank, world_size=d.world)
        fingerprint = readers[0].manifest["fingerprint"]

        def check_resume(meta: dict, ckpt: Path) -> None:
            if meta.get("data_fingerprint") != fingerprint:
                raise FormatError(f"--resume: {ckpt} was trained on another corpus (fingerprints differ)")

        run = Run(models={"student": student, "teacher": teacher}, lrs={"student": cfg.student_lr, "teacher": cfg.teacher_lr},
                  stream=stream, eval_stream=eval_stream, loss=functools.partial(micro_step, cfg=cfg, n_vocab=n_vocab),
                  score=functools.partial(score, cfg=cfg, n_vocab=n_vocab), tokenizer=tokenizer,
                  check_resume=check_resume, desc="codistill",
                  meta={"config": cfg.to_dict(), "data_fingerprint": fingerprint,
                        "tokenizer": fmt.tokenizer_fingerprint(tokenizer)["fingerprint"]})
        return fit(cfg, d, run, rd, ckpt)
