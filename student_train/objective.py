"""The objective: a student's logits on one batch -> its loss (CE, top-k or
sampled KD, the on-policy policy gradient, their CE-weighted mix), under the
settings of a LossConfig, the one check that labels can feed that loss
(`check_labels`), and the held-out score (`score`: CE, KL to the teacher,
top-1 agreement, calibration). `student-train train` (train.py),
transformers.Trainer (hf.py) and TRL (trl.py) compute them here, so the same
batch gives the same loss and metrics through each. The logits come a chunk of positions at a time
(head.py): every quantity is a sum over the chunk's positions divided by the
batch's counted positions, so the chunks' totals are the batch's means."""

from __future__ import annotations

import functools

import torch

from labelgen import format as fmt
from labelgen.errors import FormatError, OptionError
from student_train import head, losses
from student_train.config import LossConfig


def check_labels(cfg: LossConfig, readers: list, *, k: int | None = None, cross: bool = False) -> int:
    """The one check of label sets against the loss, before anything trains
    (student-train train and rounds, DistillTrainer's LabelDatasets): a loss
    the labels cannot feed fails in one line naming both. `readers` are the
    sets' ShardReaders (one kind); `k` the entries asked for (top-k kinds);
    `cross` a student with its own tokenizer. Returns the entries per position
    the loss reads."""
    first = readers[0]
    kind, stored, where = first.kind, first.k, str(first.dir)
    if cfg.loss == "kd" and kind not in ("topk", "sampled", "scored"):
        raise FormatError(f"--loss kd needs topk, sampled or scored labels; {where} holds {kind} "
                          f"(use --loss {'sft' if kind == 'samples' else 'ce'})")
    if cfg.loss == "opd" and kind != "scored":
        raise FormatError(f"--loss opd needs scored labels (the student's completions scored by the teacher: "
                          f"labelgen generate --mode score); {where} holds {kind}")
    if cfg.loss == "sft" and kind not in ("samples", "scored"):
        raise FormatError(f"--loss sft needs samples or scored labels (completions); {where} holds {kind}")
    if cross and kind not in ("topk", "sampled", "tokens"):
        raise FormatError(f"--student-tokenizer: cross-tokenizer training reads topk or sampled labels (or tokens, "
                          f"for CE); {where} holds {kind}")
    if k and kind == "sampled":
        raise FormatError("--k applies to topk labels; sampled labels are used as drawn")
    if k and kind in fmt.TOPK_KINDS and k > stored:
        raise FormatError(f"--k {k} is larger than the {stored} entries the labels hold")
    if kind in fmt.TOPK_KINDS and cfg.loss in ("kd", "opd") \
            and (problem := losses.check_tail(cfg.topk_tail, cfg.kd_kind, cfg.kd_temperature, cfg.tail is not None)):
        raise OptionError("{}: {}".format(*problem))
    if kind == "sampled" and cfg.loss == "kd" and cfg.tail not in (None, "tail"):
        raise FormatError(f"--tail {cfg.tail}: sampled labels take --tail tail (the drawn ids plus a bucket for the "
                          "teacher's mass outside them) or no --tail (the unbiased estimator)")
    for r in readers:
        if kind == "sampled" and cfg.loss == "kd" and cfg.tail == "tail" and not r.encoding.sampled_coverage:
            raise FormatError(f"--tail tail: {r.dir} holds sampled labels without the teacher's mass on the drawn "
                              "ids (written before format 2.2, or without --encoding sampled_coverage=true); "
                              "regenerate them with it, or train without --tail (the unbiased estimator)")
        if cfg.loss == "opd":
            _check_on_policy_sampling(r.manifest, str(r.dir))
    return k or stored


def _check_on_policy_sampling(manifest: dict, where: str) -> None:
    """opd's importance ratio takes the stored sampling logprob for the
    probability the token was drawn with: true for temperature 1 and top-p 1
    (the samples' logprobs are untempered), not otherwise."""
    sampling = ((manifest.get("scored") or {}).get("samples") or {}).get("sampling") or {}
    if sampling.get("temperature", 1.0) != 1.0 or sampling.get("top_p", 1.0) != 1.0:
        raise FormatError(f"--loss opd: {where} scores completions drawn at temperature {sampling.get('temperature')}, "
                          f"top-p {sampling.get('top_p')}; their stored logprobs are not the probabilities they were "
                          "drawn with, so the importance ratio would be wrong: sample at --temperature 1 --top-p 1")


def mix(ce: torch.Tensor, kd: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * CE + (1 - alpha) * KD (either alone at alpha 1 or 0: the other needs no graph)."""
    return ce if alpha == 1 else kd if alpha == 0 else alpha * ce + (1 - alpha) * kd


def loss_step(model, batch: dict, cfg: LossConfig, alpha: float = 1.0, calibration: bool = False) -> dict:
    """The student on one batch: {"objective": alpha * CE + (1 - alpha) * KD
    (differentiable), "ce", "kd"}, per counted position. ce is on the actual
    next tokens (or the completion, prompt masked); kd is top-k or sampled
    KD for loss=kd, the on-policy objective for loss=opd (with its
    statistics: advantage, clipped share, staleness, policy_gradient,
    forward_kl), else 0. calibration=True adds "calibration", the
    [ECE_BINS] gaps of losses.calibration_gaps."""
    n = batch["mask"].sum().clamp(min=1)
    terms = functools.partial(step_terms, cfg=cfg, alpha=alpha, n=n, calibration=calibration)
    return head.run(model, batch, terms, cfg.head_chunk_mb)


def step_terms(z: torch.Tensor, rows: dict, *, cfg: LossConfig, alpha: float, n: torch.Tensor,
               calibration: bool = False) -> dict:
    """loss_step's quantities on logits z [..., V] of some positions, their
    labels `rows` [..., ...]: sums over those positions / n."""
    mask, targets = rows["mask"], rows["targets"]
    lse = losses.logsumexp_chunked(z)
    ce = losses.cross_entropy_terms(z, targets, mask, lse=lse)
    out = {"ce": ce.sum() / n}
    if calibration:
        out["calibration"] = losses.calibration_sums(z.detach(), targets, mask, lse.detach()) / n
    shared = lse if cfg.kd_temperature == 1.0 else None
    if cfg.loss == "opd":
        kd = opd_terms(z, rows, cfg, lse, out, n)
    elif cfg.loss != "kd":
        kd = torch.zeros_like(ce)
    else:
        labelled = rows.get("kd_mask", mask)   # cross-tokenizer batches: the positions aligned with a teacher one
        if "sampled_ids" in rows and cfg.tail == "tail":   # the drawn ids + a bucket for the rest
            kd = losses.sampled_tail_terms(z, rows["sampled_ids"], rows["sampled_weights"], rows["sampled_coverage"],
                                           labelled, rows.get("sampled_logprobs"), kind=cfg.kd_kind, beta=cfg.beta,
                                           lse=shared)
        elif "sampled_ids" in rows:
            kd = losses.sampled_kd_terms(z, rows["sampled_ids"], rows["sampled_weights"], labelled,
                                         temperature=cfg.kd_temperature, lse=shared)
        else:
            kd = losses.topk_kd_terms(z, rows["topk_ids"], rows["topk_logprobs"], rows["coverage"], labelled,
                                      kind=cfg.kd_kind, tail=cfg.topk_tail, temperature=cfg.kd_temperature,
                                      beta=cfg.beta, lse=shared, targets=targets)
        if "kd_mask" in rows:
            # KD stands in for CE only where it exists: an unlabelled position keeps its CE at full weight in the
            # kd term, so alpha * ce + (1 - alpha) * kd is alpha * CE + (1 - alpha) * KD where labelled and CE
            # elsewhere. (Mixed over every position, alpha = 0.5 halved the only signal of the positions inside
            # teacher tokens: their held-out CE went from 2.77 to 4.22 nats and KD ended worse than CE only.)
            kd = kd + losses.counted(ce, mask & ~labelled)
    out["kd"] = kd.sum() / n
    out["objective"] = mix(out["ce"], out["kd"], alpha)
    return out


def opd_terms(z: torch.Tensor, rows: dict, cfg: LossConfig, lse: torch.Tensor, out: dict,
              n: torch.Tensor) -> torch.Tensor:
    """On-policy distillation at the completion tokens of scored labels, per
    position: the reverse-KL policy gradient against the sampling-time
    logprobs (clipped), plus cfg.opd_forward_kl x forward KL on the teacher's
    top-k + tail. Its statistics (sums / n) go into `out`."""
    terms = losses.on_policy_terms(z, rows["targets"], rows["teacher_logprob"], rows["sampling_logprob"],
                                   rows["mask"], clip=cfg.opd_clip, lse=lse)
    pg = terms["policy_gradient"]
    out.update({name: v.detach().sum() / n for name, v in terms.items()})
    if cfg.opd_forward_kl == 0:
        return pg
    forward = losses.topk_kd_terms(z, rows["topk_ids"], rows["topk_logprobs"], rows["coverage"], rows["mask"],
                                   kind="forward", tail=cfg.topk_tail, lse=lse, targets=rows["targets"])
    out["forward_kl"] = forward.detach().sum() / n
    return pg + cfg.opd_forward_kl * forward


def score(models: dict, batch: dict, *, head_chunk_mb: float | None = None) -> dict:
    """Held-out CE on actual tokens and the calibration bins (eval_ece); for
    topk labels also KL(teacher||student) over the top-k plus tail bucket and
    top-1 agreement with the teacher."""
    out = head.run(models["student"], batch, functools.partial(held_out_terms, n=batch["mask"].sum().clamp(min=1),
                                                               n_kd=batch.get("kd_mask", batch["mask"]).sum().clamp(min=1)),
                   head_chunk_mb)
    out.pop("objective")
    out.update(losses.calibration_metrics(out.pop("calibration")))
    if "target_bytes" in batch:   # bytes per counted token: with ce, bits per byte (runtime.evaluate)
        out["bytes"] = losses.masked_mean(batch["target_bytes"], batch["mask"])
    return out


def held_out_terms(z, rows: dict, *, n, n_kd) -> dict:
    """score's quantities on the logits z [..., V] of some positions: sums / the batch's counted positions
    (n; n_kd for the teacher comparisons, counted where labelled)."""
    mask, targets = rows["mask"], rows["targets"]
    lse = losses.logsumexp_chunked(z)
    ce = losses.cross_entropy_terms(z, targets, mask, lse=lse).sum() / n
    out = {"objective": ce, "ce": ce, "calibration": losses.calibration_sums(z, targets, mask, lse) / n}
    if "topk_ids" in rows:
        kd_mask = rows.get("kd_mask", mask)
        out["kl"] = losses.topk_kd_terms(z, rows["topk_ids"], rows["topk_logprobs"], rows["coverage"],
                                         kd_mask, tail="tail", lse=lse).sum() / n_kd
        out["top1"] = losses.topk_agreement_terms(z, rows["topk_ids"], rows["topk_logprobs"], kd_mask).sum() / n_kd
    return out
