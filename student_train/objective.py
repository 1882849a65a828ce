"""The objective: a student's logits on one batch -> its loss (CE, top-k or
sampled KD, the on-policy policy gradient, their alpha mix), under the
settings of a LossConfig. `student-train train` (train.py) and
transformers.Trainer (hf.py) compute it here, so the same batch gives the
same loss through both."""

from __future__ import annotations

import contextlib

import torch

from labelgen.format import FormatError
from student_train import losses
from student_train.config import LossConfig


def mix(ce: torch.Tensor, kd: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * CE + (1 - alpha) * KD (either alone at alpha 1 or 0: the other needs no graph)."""
    return ce if alpha == 1 else kd if alpha == 0 else alpha * ce + (1 - alpha) * kd


def student_logits(model, batch: dict) -> torch.Tensor:
    """[B, T-1, V]: the logits that predict each next token."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]


def loss_step(model, batch: dict, cfg: LossConfig, alpha: float = 1.0, logits: torch.Tensor | None = None,
              stats: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce, kd) per counted position. ce is on the actual next tokens (or the
    completion, prompt masked); kd is top-k or sampled KD for loss=kd, the
    on-policy objective for loss=opd, else 0. The logits' logsumexp is
    computed once for both; at alpha = 0 ce is only measured (no gradient).
    `logits`: the student's, if the caller already ran it (student_logits);
    `stats`: filled with opd's statistics (advantage, clipped share,
    staleness, forward KL)."""
    logits = student_logits(model, batch) if logits is None else logits
    lse = losses.logsumexp_chunked(logits)
    with contextlib.nullcontext() if alpha > 0 else torch.no_grad():
        ce = losses.cross_entropy(logits, batch["targets"], batch["mask"], lse=lse)
    if cfg.loss == "opd":
        return ce, opd_objective(logits, batch, cfg, lse, {} if stats is None else stats)
    if cfg.loss != "kd":
        return ce, torch.zeros_like(ce)
    shared = lse if cfg.temperature == 1.0 else None
    if "sampled_ids" in batch:
        return ce, losses.sampled_kd(logits, batch["sampled_ids"], batch["sampled_weights"], batch["mask"],
                                     temperature=cfg.temperature, lse=shared)
    if "kd_mask" not in batch:
        return ce, losses.topk_kd(logits, batch["topk_ids"], batch["topk_logprobs"], batch["coverage"], batch["mask"],
                                  kind=cfg.kd_kind, tail=cfg.tail, temperature=cfg.temperature, beta=cfg.beta,
                                  lse=shared, targets=batch["targets"])
    # Cross-tokenizer batches label only the positions aligned with a teacher position (kd_mask). KD stands
    # in for CE only where it exists: an unlabelled position keeps its CE at full weight in the kd term, so
    # alpha * ce + (1 - alpha) * kd is alpha * CE + (1 - alpha) * KD where labelled and CE elsewhere. (Mixed
    # over every position, alpha = 0.5 halved the only signal of the positions inside teacher tokens: their
    # held-out CE went from 2.77 to 4.22 nats and KD ended worse than CE only.)
    labelled, counted = batch["kd_mask"], batch["mask"]
    unlabelled = counted & ~labelled
    kd = losses.topk_kd(logits, batch["topk_ids"], batch["topk_logprobs"], batch["coverage"], labelled,
                        kind=cfg.kd_kind, tail=cfg.tail, temperature=cfg.temperature, beta=cfg.beta, lse=shared,
                        targets=batch["targets"])
    ce_unlabelled = losses.cross_entropy(logits, batch["targets"], unlabelled, lse=lse)
    n = counted.sum().clamp(min=1)
    return ce, (kd * labelled.sum() + ce_unlabelled * unlabelled.sum()) / n


def opd_objective(logits: torch.Tensor, batch: dict, cfg: LossConfig, lse: torch.Tensor, stats: dict) -> torch.Tensor:
    """On-policy distillation at the completion tokens of scored labels: the
    reverse-KL policy gradient against the sampling-time logprobs (clipped),
    plus cfg.opd_forward_kl x forward KL on the teacher's top-k + tail."""
    if "sampling_logprob" not in batch:
        raise FormatError("--loss opd needs scored labels (teacher_logprob and sampling_logprob per completion token)")
    pg, pg_stats = losses.on_policy_kd(logits, batch["targets"], batch["teacher_logprob"], batch["sampling_logprob"],
                                       batch["mask"], clip=cfg.opd_clip, lse=lse)
    stats.update(pg_stats, policy_gradient=pg.detach())
    if cfg.opd_forward_kl == 0:
        return pg
    forward = losses.topk_kd(logits, batch["topk_ids"], batch["topk_logprobs"], batch["coverage"], batch["mask"],
                             kind="forward", tail=cfg.tail, lse=lse, targets=batch["targets"])
    stats["forward_kl"] = forward.detach()
    return pg + cfg.opd_forward_kl * forward
