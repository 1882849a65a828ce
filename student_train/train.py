"""Train a student on label shards: `student-train train --labels DIR ...`.

Reads top to bottom: what the labels need of the loss, one micro-batch (its
objective is objective.py's; the student's fit to the labels, vocab.py's), the
held-out score, then `train`: open the labels, build the student and hand both
to the shared loop (`runtime.fit`: gradient accumulation, DDP/FSDP under torchrun,
logging, evaluation, checkpoints and exact resume).
"""

from __future__ import annotations

import functools
from pathlib import Path

from labelgen import format as fmt
from labelgen.format import FormatError
from student_train import head, losses
from student_train.config import TrainConfig
from student_train.data import LabelStream, holdout_split, open_label_sets
from student_train.objective import loss_step
from student_train.runtime import Run, build_model, fit, run_dir, setup_distributed
from student_train.vocab import check_vocabulary, check_width, load_tokenizer_for, token_byte_lengths


def check_loss_fits_labels(cfg: TrainConfig, kind: str, stored_k: int) -> int:
    if cfg.loss == "kd" and kind not in ("topk", "sampled", "scored"):
        raise FormatError(f"--loss kd needs topk, sampled or scored labels; {cfg.labels[0]} holds {kind} "
                          f"(use --loss {'sft' if kind == 'samples' else 'ce'})")
    if cfg.loss == "opd" and kind != "scored":
        raise FormatError(f"--loss opd needs scored labels (the student's completions scored by the teacher: "
                          f"labelgen generate --mode score); {cfg.labels[0]} holds {kind}")
    if cfg.student_tokenizer and kind not in ("topk", "sampled", "tokens"):
        raise FormatError(f"--student-tokenizer: cross-tokenizer training reads topk or sampled labels (or tokens, "
                          f"for CE); {cfg.labels[0]} holds {kind}")
    if cfg.loss == "sft" and kind not in ("samples", "scored"):
        raise FormatError(f"--loss sft needs samples or scored labels (completions); {cfg.labels[0]} holds {kind}")
    k = cfg.k or stored_k
    if cfg.k and kind == "sampled":
        raise FormatError("--k applies to topk labels; sampled labels are used as drawn")
    if kind in fmt.TOPK_KINDS and cfg.loss in ("kd", "opd") \
            and (problem := losses.check_tail(cfg.topk_tail, cfg.kd_kind, cfg.temperature)):
        raise ValueError("{}: {}".format(*problem))
    if kind == "sampled" and cfg.loss == "kd" and cfg.tail not in (None, "tail"):
        raise FormatError(f"--tail {cfg.tail}: sampled labels take --tail tail (the drawn ids plus a bucket for the "
                          "teacher's mass outside them) or no --tail (the unbiased estimator)")
    if kind in fmt.TOPK_KINDS and k > stored_k:
        raise FormatError(f"--k {k} is larger than the {stored_k} entries the labels hold")
    return k


def check_on_policy_sampling(manifest: dict, where: str) -> None:
    """opd's importance ratio takes the stored sampling logprob for the
    probability the token was drawn with: true for temperature 1 and top-p 1
    (the samples' logprobs are untempered), not otherwise."""
    sampling = ((manifest.get("scored") or {}).get("samples") or {}).get("sampling") or {}
    if sampling.get("temperature", 1.0) != 1.0 or sampling.get("top_p", 1.0) != 1.0:
        raise FormatError(f"--loss opd: {where} scores completions drawn at temperature {sampling.get('temperature')}, "
                          f"top-p {sampling.get('top_p')}; their stored logprobs are not the probabilities they were "
                          "drawn with, so the importance ratio would be wrong: sample at --temperature 1 --top-p 1")


# ---------------------------------------------------------------- one micro-batch, one held-out batch


def micro_step(models: dict, batch: dict, alpha: float, backward, *, cfg: TrainConfig) -> dict:
    """One micro-batch: alpha * CE + (1 - alpha) * KD (or the opd objective), back-propagated."""
    out = loss_step(models["student"], batch, cfg, alpha)
    backward(out["objective"])
    return {"loss": out.pop("objective"), **out}


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


# ---------------------------------------------------------------- the command


def train(cfg: TrainConfig) -> dict:
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()   # checkpoint saves would print bars of their own
    d = setup_distributed(cfg.device)
    readers = open_label_sets(list(cfg.labels), cfg.verify)
    manifest = readers[0].manifest
    if sum(r.manifest["counts"]["positions"] for r in readers) == 0:
        raise FormatError(f"--labels: {', '.join(cfg.labels)} hold no positions to train on (empty, or every completion is empty)")
    k = check_loss_fits_labels(cfg, readers[0].kind, readers[0].k)
    if readers[0].kind == "sampled" and cfg.loss == "kd" and cfg.tail == "tail":
        for r in readers:
            if not r.encoding.sampled_coverage:
                raise FormatError(f"--tail tail: {r.dir} holds sampled labels without the teacher's mass on the drawn "
                                  "ids (written before format 2.2, or without --encoding sampled_coverage=true); "
                                  "regenerate them with it, or train without --tail (the unbiased estimator)")
    if cfg.loss == "opd":
        for r in readers:
            check_on_policy_sampling(r.manifest, str(r.dir))
    cross = None
    if cfg.student_tokenizer:   # cross-tokenizer: the student reads its own tokenization of the labelled text
        tokenizer = load_tokenizer_for(None, Path(cfg.student_tokenizer), "--student-tokenizer")
        model = build_model(cfg.student, cfg.student_config, tokenizer, cfg.seed)
        width = check_width(model, tokenizer, "--student-tokenizer")
    else:
        tokenizer = load_tokenizer_for(cfg.student, readers[0].dir)
        model = build_model(cfg.student, cfg.student_config, tokenizer, cfg.seed)
        width = check_vocabulary(manifest, tokenizer, model, str(readers[0].dir))
    with run_dir(cfg, d) as (rd, ckpt):
        if cfg.student_tokenizer:
            from student_train.xtok import CrossTokenizer
            cross = CrossTokenizer(load_tokenizer_for(None, readers[0].dir), tokenizer, rd.local if d.main else None)
        train_shards, eval_shards = holdout_split(readers, cfg.eval_holdout)
        stream = LabelStream(readers, cfg.batch_size, seed=cfg.seed, group_units=cfg.group_units, rank=d.rank,
                             world_size=d.world, k=k, vocab_limit=width, shards=train_shards, cross=cross)
        eval_stream = None
        if cfg.eval_labels or eval_shards:
            eval_readers = open_label_sets(list(cfg.eval_labels), cfg.verify) if cfg.eval_labels else readers
            for r in eval_readers:
                if cross is None:
                    check_vocabulary(r.manifest, tokenizer, model, str(r.dir))
                elif r.manifest.get("tokenizer") != manifest.get("tokenizer"):
                    raise FormatError(f"--eval-labels: {r.dir} was made with another tokenizer than --labels")
            eval_stream = LabelStream(eval_readers, cfg.batch_size, shuffle=False, rank=d.rank, world_size=d.world,
                                      k=None, vocab_limit=width, shards=None if cfg.eval_labels else eval_shards,
                                      cross=cross, byte_lengths=None if cross else token_byte_lengths(tokenizer, width))
        fingerprints = [r.manifest["fingerprint"] for r in readers]

        def check_resume(meta: dict, ckpt: Path) -> None:
            if meta.get("labels_fingerprints") != fingerprints:
                raise FormatError(f"--resume: {ckpt} was trained on other labels (fingerprints differ)")

        run = Run(models={"student": model}, lrs={"student": cfg.lr}, stream=stream, eval_stream=eval_stream,
                  loss=functools.partial(micro_step, cfg=cfg), score=functools.partial(score, head_chunk_mb=cfg.head_chunk_mb), tokenizer=tokenizer,
                  check_resume=check_resume, desc="student-train",
                  meta={"config": cfg.to_dict(), "labels_fingerprints": fingerprints,
                        "tokenizer": fmt.tokenizer_fingerprint(tokenizer)["fingerprint"]})
        return fit(cfg, d, run, rd, ckpt)
