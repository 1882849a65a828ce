"""Distillation losses, all in one place.

Shapes: B batch, T positions, V student vocabulary, K stored top-k entries.
Every loss takes a boolean `mask` [B, T] of positions that count, returns a
scalar normalised per counted position, and returns 0 (with a gradient path)
when nothing counts.

Sampled KD (`sampled_kd`) is the cross-entropy against the empirical
distribution of N teacher draws per position.

Top-k KD compares the teacher's stored top-k with the student on a shared
support, chosen by `tail`:
  renorm  the teacher's top-k renormalised to sum to 1, against the student's
          softmax restricted to the same K ids;
  tail    K+1 buckets: the K teacher probabilities plus the missing mass
          1 - coverage, against the student's probabilities of those K ids
          plus all of its remaining mass.
  target  the missing mass 1 - coverage is given to the actual next token
          (Anshumann et al., 2025: "top-k with the leftover mass on the
          ground truth"): added to its entry when it is among the K, else
          one more bucket for it; against the student's probabilities of
          those ids plus all of its remaining mass (where the teacher puts
          0, so forward KL is the student's cross-entropy on that support).
`temperature` T re-tempers both sides: p_i ∝ p_i^(1/T) and q ∝ softmax(z/T).
On the renorm support this is exact — tempering and renormalising over a
fixed set of ids commute — but it is the tempered *truncated* teacher, not
the truncation of the tempered full teacher (whose top-k mass would differ).
With `tail` the shape of the missing mass is unknown, so re-tempering it is
undefined and only T = 1 is accepted (with `target` too). Reverse KL is
undefined on `target`'s support (the teacher gives the rest bucket 0). Losses at T != 1 are multiplied by T²
(Hinton et al.) so gradient scales stay comparable across temperatures.
"""

from __future__ import annotations

import math

import torch

from labelgen.errors import OptionError

KD_KINDS = ("forward", "reverse", "jsd")   # divergences (record kinds are labelgen.format.KINDS)
TAILS = ("renorm", "tail", "target")
# Bytes of fp32 logits processed at once by the full-vocabulary reductions.
CHUNK_BYTES = 256 << 20


def masked_mean(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over counted positions; 0 when none count."""
    m = mask.to(per_position.dtype)
    return (per_position * m).sum() / m.sum().clamp(min=1)


def logsumexp_chunked(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim in fp32 without an fp32 copy of all logits."""
    flat = logits.reshape(-1, logits.shape[-1])
    chunk = max(1, CHUNK_BYTES // (4 * logits.shape[-1]))
    out = torch.cat([torch.logsumexp(c.float(), dim=-1) for c in flat.split(chunk)])
    return out.reshape(logits.shape[:-1])


def counted(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The values at counted positions, 0 elsewhere (padding's filler labels may compute anything)."""
    return torch.where(mask, per_position, torch.zeros_like(per_position))


def cross_entropy_terms(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                        lse: torch.Tensor | None = None) -> torch.Tensor:
    """Per position [B,T]: CE of the student's logits [B,T,V] against token
    ids [B,T], 0 where not counted. `lse`: the logits' logsumexp [B,T] if the
    caller has it (one pass shared with KD)."""
    lse = logsumexp_chunked(logits) if lse is None else lse
    tgt = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1).float()
    return counted(lse - tgt, mask)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                  lse: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of cross_entropy_terms over counted positions."""
    return masked_mean(cross_entropy_terms(logits, targets, mask, lse), mask)


def _divergence(logp: torch.Tensor, logq: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Per-position divergence between log-distributions over the last dim.
    Entries with p = 0 (logp = -inf) contribute 0 to forward KL."""
    p, q = logp.exp(), logq.exp()
    if kind == "forward":
        return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)
    if kind == "reverse":
        return torch.where(q > 0, q * (logq - logp.clamp(min=-1e4)), torch.zeros_like(q)).sum(-1)
    m = beta * p + (1 - beta) * q
    logm = m.clamp(min=1e-30).log()
    kl_pm = torch.where(p > 0, p * (logp - logm), torch.zeros_like(p)).sum(-1)
    kl_qm = torch.where(q > 0, q * (logq - logm), torch.zeros_like(q)).sum(-1)
    return beta * kl_pm + (1 - beta) * kl_qm


def check_tail(tail: str, kind: str, temperature: float, tail_given: bool = True) -> tuple[str, str] | None:
    """(option, what is wrong and the way out) with this support, kind and temperature, or None;
    `tail_given`: the user chose `tail` (else it is the default for top-k labels)."""
    if tail not in TAILS:
        return "--tail", f"must be one of {', '.join(TAILS)}, got {tail!r}"
    if tail != "renorm" and temperature != 1.0:
        chosen = f"--tail {tail}" if tail_given else f"--tail {tail} (the default for top-k labels)"
        return "--kd-temperature", (f"{temperature:g} cannot soften the mass outside the top k under {chosen}, whose "
                                    "shape is unknown: pass --tail renorm to soften the top k alone, or leave "
                                    "--kd-temperature at 1")
    if tail == "target" and kind == "reverse":
        return "--kd-kind", "must be forward or jsd with --tail target (reverse KL is undefined where the teacher puts 0)"
    return None


def topk_kd(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, coverage: torch.Tensor,
            mask: torch.Tensor, kind: str = "forward", tail: str = "renorm", temperature: float = 1.0,
            beta: float = 0.5, lse: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> torch.Tensor:
    """KD against stored top-k labels: the mean of topk_kd_terms over counted positions."""
    return masked_mean(topk_kd_terms(logits, topk_ids, topk_logprobs, coverage, mask, kind, tail, temperature, beta,
                                     lse, targets), mask)


def topk_kd_terms(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, coverage: torch.Tensor,
                  mask: torch.Tensor, kind: str = "forward", tail: str = "renorm", temperature: float = 1.0,
                  beta: float = 0.5, lse: torch.Tensor | None = None,
                  targets: torch.Tensor | None = None) -> torch.Tensor:
    """Per position [B,T]: KD against stored top-k labels, 0 where not counted.

    logits [B,T,V] student; topk_ids [B,T,K] (long); topk_logprobs [B,T,K]
    teacher logprobs, -inf for empty slots; coverage [B,T] teacher mass in the
    top-k; mask [B,T]; lse [B,T] the logits' logsumexp, if already computed;
    targets [B,T] the actual next tokens (tail="target" only).
    """
    if kind not in KD_KINDS:
        raise OptionError(f"kind must be one of {KD_KINDS}")
    problem = check_tail(tail, kind, temperature)
    if problem:
        raise OptionError("{}: {}".format(*problem))
    if tail == "target" and targets is None:
        raise OptionError("tail='target' needs the actual next tokens (targets)")
    t_lp = topk_logprobs.float()
    s = logits.gather(-1, topk_ids).float() / temperature                   # [B,T,K]
    # Empty slots (adaptive truncation, padded vocabulary) are not part of the
    # shared support: the student's logit there must not count either.
    s = s.masked_fill(torch.isneginf(t_lp), torch.finfo(s.dtype).min / 4)
    if tail == "renorm":
        logp = torch.log_softmax(t_lp / temperature, dim=-1)
        logq = torch.log_softmax(s, dim=-1)
    elif tail == "target":
        lse = logsumexp_chunked(logits) if lse is None else lse              # [B,T]
        y = targets.clamp(min=0)
        hit = (topk_ids == y.unsqueeze(-1)) & torch.isfinite(t_lp)           # [B,T,K]
        in_k = hit.any(-1)
        missing = (1 - coverage.float()).clamp(min=0)
        p_k = t_lp.exp() + missing.unsqueeze(-1) * hit                       # the leftover on the target's entry,
        p_y = torch.where(in_k, torch.zeros_like(missing), missing)          # or on a bucket of its own
        logq_k = s - lse.unsqueeze(-1)
        logq_y = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1).float() - lse
        q_rest = 1 - logq_k.exp().sum(-1) - torch.where(in_k, torch.zeros_like(logq_y), logq_y.exp())
        logq_rest = q_rest.clamp(min=1e-6).log()
        # The target's own bucket duplicates its entry when it is among the K: empty (p = 0, q = 0) then.
        logq_y = logq_y.masked_fill(in_k, float("-inf"))
        logp = torch.cat([p_k.log(), p_y.log().unsqueeze(-1), torch.full_like(missing, float("-inf")).unsqueeze(-1)], -1)
        logq = torch.cat([logq_k, logq_y.unsqueeze(-1), logq_rest.unsqueeze(-1)], -1)
    else:
        lse = logsumexp_chunked(logits) if lse is None else lse              # [B,T]
        logq_k = s - lse.unsqueeze(-1)
        # log(1 - sum q_k), computed stably; the clamp keeps a student that
        # puts all its mass on the K ids from producing log(0).
        logq_tail = torch.log1p(-logq_k.exp().sum(-1).clamp(max=1 - 1e-6))
        logp_tail = torch.log1p(-coverage.float().clamp(max=1.0))           # -inf when coverage is 1
        logp = torch.cat([t_lp, logp_tail.unsqueeze(-1)], dim=-1)
        logq = torch.cat([logq_k, logq_tail.unsqueeze(-1)], dim=-1)
    # Padding positions hold filler labels; keep whatever they compute out of the sum.
    return counted(_divergence(logp, logq, kind, beta), mask) * temperature ** 2


def sampled_kd(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor,
               temperature: float = 1.0, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the student against sampled soft labels: the mean of
    sampled_kd_terms over counted positions. Its gradient is an unbiased
    estimate of the full forward-KL gradient (Anshumann et al., 2025)."""
    return masked_mean(sampled_kd_terms(logits, ids, weights, mask, temperature, lse), mask)


def sampled_kd_terms(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor,
                     temperature: float = 1.0, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Per position [B,T]: cross-entropy of the student against ids [B,T,M]
    drawn from the teacher, weights [B,T,M] their (importance-corrected)
    empirical probabilities, 0 in empty slots; 0 where not counted.
    `lse`: the logsumexp of logits / temperature, if already computed."""
    z = logits.gather(-1, ids).float() / temperature
    logq = z - (logsumexp_chunked(logits / temperature) if lse is None else lse).unsqueeze(-1)
    return counted(-(weights.float() * logq).sum(-1), mask) * temperature ** 2


def sampled_tail_terms(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, coverage: torch.Tensor,
                       mask: torch.Tensor, logprobs: torch.Tensor | None = None, kind: str = "forward",
                       beta: float = 0.5, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Per position [B,T]: KD on the drawn ids plus one bucket for the rest
    (top-k's `tail` with the drawn ids as the support). The teacher's buckets:
    its exact mass on the drawn ids, `coverage` [B,T], shared among them by
    their teacher logprobs [B,T,M] where the set stores them (renormalised),
    else by their empirical `weights` [B,T,M]; the rest, 1 - coverage. The
    student's: its probabilities of the drawn ids and all its remaining mass.
    A never-drawn id then gets full KD's aggregate push (q_j (1 - p_rest /
    q_rest)) instead of the estimator's push down (q_j); 0 where not counted."""
    valid = weights > 0
    if logprobs is not None:
        share = torch.softmax(logprobs.float().masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)
    else:   # renormalised: a cross-tokenizer batch's weights sum to the share of the draws with a student token
        share = weights.float() / weights.float().sum(-1, keepdim=True).clamp(min=1e-30)
    inside = (coverage.float().unsqueeze(-1) * share).log().masked_fill(~valid, float("-inf"))
    return topk_kd_terms(logits, ids, inside, coverage, mask, kind=kind, tail="tail", beta=beta, lse=lse)


def full_kd(logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, kind: str = "forward",
            temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """KD against the teacher's full distribution (online distillation): the mean of full_kd_terms."""
    return masked_mean(full_kd_terms(logits, teacher_logits, mask, kind, temperature, beta), mask)


def full_kd_terms(logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, kind: str = "forward",
                  temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Per position [B,T]: KD against the teacher's full logits [B,T,V], 0 where not counted."""
    logq = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return counted(_divergence(logp, logq, kind, beta), mask) * temperature ** 2


def on_policy_kd(logits: torch.Tensor, targets: torch.Tensor, teacher_logprob: torch.Tensor,
                 sampler_logprob: torch.Tensor, mask: torch.Tensor, clip: float = 0.2,
                 lse: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """On-policy distillation at the tokens y_t the student sampled (`mask`:
    completion tokens only), as a policy gradient with discount 0: the
    per-token reverse-KL advantage A_t = log pT(y_t) - log p(y_t) (no
    gradient through it), weighted by the importance ratio r_t = p(y_t) /
    p_old(y_t) against the sampling-time logprob, clipped to [1 - clip,
    1 + clip] as in PPO so a stale sample cannot push far:
        loss = -mean_t min(r_t A_t, clip(r_t) A_t).
    At r = 1 its gradient is sum_t (log p - log pT)(y_t) grad log p(y_t), the
    sampled gradient of KL(p || pT). Returns the loss and per-position
    statistics: the advantage, the share of clipped tokens, and log p_old -
    log p (its mean estimates KL(p_old || p), how stale the samples are)."""
    terms = on_policy_terms(logits, targets, teacher_logprob, sampler_logprob, mask, clip, lse)
    loss = masked_mean(terms.pop("policy_gradient"), mask)
    return loss, {name: masked_mean(v, mask) for name, v in terms.items()}


def on_policy_terms(logits: torch.Tensor, targets: torch.Tensor, teacher_logprob: torch.Tensor,
                    sampler_logprob: torch.Tensor, mask: torch.Tensor, clip: float = 0.2,
                    lse: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per position [B,T], 0 where not counted: on_policy_kd's loss
    (policy_gradient) and its statistics (advantage, clipped, staleness)."""
    lse = logsumexp_chunked(logits) if lse is None else lse
    logp = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1).float() - lse
    adv = (teacher_logprob.float() - logp).detach()
    log_ratio = logp - sampler_logprob.float()
    ratio = log_ratio.clamp(max=30).exp()   # bounded: a sample the student now finds far likelier
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    clipped = ratio.clamp(1 - clip, 1 + clip) * adv < ratio * adv   # the min took the clipped term: no gradient
    return {"policy_gradient": counted(-surrogate, mask), "advantage": counted(adv, mask),
            "clipped": counted(clipped.float(), mask), "staleness": counted(-log_ratio.detach(), mask)}


def topk_agreement_terms(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """Per position [B,T]: 1 where the student's argmax is the teacher's top-1, 0 elsewhere or not counted."""
    top1 = topk_ids.gather(-1, topk_logprobs.argmax(-1, keepdim=True)).squeeze(-1)
    return counted((logits.argmax(-1) == top1).float(), mask)


ECE_BINS = 15


def calibration_gaps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                     lse: torch.Tensor | None = None) -> torch.Tensor:
    """[ECE_BINS]: per bin of the student's top-1 probability (equal widths
    over [0, 1]), the mean over counted positions of (top-1 correct -
    top-1 probability) for positions in that bin, 0 elsewhere. Being means
    over positions, they average across batches and ranks like any other
    metric; the expected calibration error is the sum of their absolute
    values (`expected_calibration_error`), taken once at the end."""
    return calibration_sums(logits, targets, mask, lse) / mask.sum().clamp(min=1)


def calibration_sums(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                     lse: torch.Tensor | None = None) -> torch.Tensor:
    """[ECE_BINS]: calibration_gaps before the division by the counted positions."""
    lse = logsumexp_chunked(logits) if lse is None else lse
    top = logits.max(-1)
    conf = (top.values.float() - lse).exp()
    gap = counted((top.indices == targets).float() - conf, mask)
    bins = (conf * ECE_BINS).long().clamp(0, ECE_BINS - 1)
    return torch.zeros(ECE_BINS, dtype=gap.dtype, device=gap.device).index_add_(0, bins.flatten(), gap.flatten())


CALIBRATION_PREFIX = "ece_gap"   # the bins' metric names; the evaluation folds them into eval_ece


def calibration_metrics(gaps: torch.Tensor) -> dict[str, torch.Tensor]:
    """The [ECE_BINS] gaps as named per-position metrics (ece_gap00 ... ece_gap14)."""
    return {f"{CALIBRATION_PREFIX}{b:02d}": g for b, g in enumerate(gaps)}


def expected_calibration_error(gaps) -> float:
    """ECE from the bins' averaged gaps: sum over bins of |accuracy - confidence| x the bin's share of positions."""
    return float(sum(abs(float(g)) for g in gaps))


def ramp(step: int, start: float, end: float | None, ramp_start: int = 0, ramp_steps: int = 0,
         shape: str = "linear") -> float:
    """A weight at `step` (the CE weight of both trainers): `start` until ramp_start, then linear (or
    cosine) to `end` over ramp_steps steps, then `end`. end=None: constant."""
    if end is None or step < ramp_start:
        return start
    frac = min(1.0, (step - ramp_start) / ramp_steps) if ramp_steps else 1.0
    if shape == "cosine":
        frac = 0.5 * (1 - math.cos(math.pi * frac))
    return start + (end - start) * frac
