"""Train a student on label shards: `student-train train --labels DIR ...`.

Reads top to bottom: what the labels need of the student (tokenizer,
vocabulary, loss), the loss of one micro-batch, the held-out score, then
`train`: open the labels, build the student and hand both to the shared
loop (`runtime.fit`: gradient accumulation, DDP/FSDP under torchrun,
logging, evaluation, checkpoints and exact resume).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import numpy as np
import torch

from labelgen import format as fmt
from labelgen import storage
from labelgen.format import FormatError
from student_train import losses
from student_train.config import TrainConfig
from student_train.data import LabelStream, holdout_split, open_label_sets
from student_train.runtime import Run, build_model, fit, run_dir, setup_distributed


def load_tokenizer_for(student: str | None, label_dir: Path, option: str | None = None):
    """The student's own tokenizer if its directory has one, else the labels'
    (or, with `option`, the tokenizer in the directory that option names)."""
    from transformers import AutoTokenizer
    if option:
        if not any((label_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise FormatError(f"{option}: {label_dir} holds no tokenizer (tokenizer.json / tokenizer_config.json)")
        return AutoTokenizer.from_pretrained(label_dir, trust_remote_code=False)
    for where in ([Path(student)] if student else []) + [storage.location(label_dir) / fmt.TOKENIZER_DIR]:
        if (where / "tokenizer_config.json").is_file() or (where / "tokenizer.json").is_file():
            try:   # a label set in a bucket: its tokenizer is copied to a local cache first
                return AutoTokenizer.from_pretrained(storage.local_dir(where), trust_remote_code=False)
            except (OSError, ValueError) as e:
                raise FormatError(f"{where}: cannot load the tokenizer ({e})") from None
    raise FormatError(f"{label_dir}: the labels carry no tokenizer ({fmt.TOKENIZER_DIR}/) and the student has none; "
                      "pass --student with a tokenizer")


def check_vocabulary(manifest: dict, tokenizer, model, where: str) -> int:
    """Refuse a student whose tokenizer differs from the labels'. Returns the
    student's logits width. Rule for padded vocabularies: the student's logits
    may be wider than the tokenizer (extra slots simply never get labels);
    label ids at or beyond the student's width — the teacher's own padding —
    are dropped from the top-k (they carry ~0 probability)."""
    labels_tok = manifest.get("tokenizer")
    student_tok = fmt.tokenizer_fingerprint(tokenizer)
    if not labels_tok:
        raise FormatError(f"{where}: the manifest has no tokenizer fingerprint; cannot check the student against it")
    if labels_tok["fingerprint"] != student_tok["fingerprint"]:
        raise FormatError(f"{where}: the labels were made with a different tokenizer than the student's "
                          f"(differs in: {fmt.tokenizer_difference(labels_tok, student_tok)}); to distill across "
                          "tokenizers pass --student-tokenizer DIR")
    return check_width(model, tokenizer, where)


def check_width(model, tokenizer, where: str) -> int:
    """The student's logits width, which must cover its tokenizer."""
    width = model.get_output_embeddings().weight.shape[0]
    if width < len(tokenizer):
        raise FormatError(f"{where}: the student's logits are {width} wide but its tokenizer has {len(tokenizer)} tokens")
    return width


def check_width_against_labels(manifest: dict, width: int, where: str) -> None:
    """Without the student's tokenizer, its logits width must be one the
    labels name: their tokenizer's length or their id bound (the teacher's
    logits, padding included). Narrower fails mid-run on an id it lacks;
    any other width is most likely another tokenizer's model, which would
    train silently on these ids."""
    tokens = (manifest.get("tokenizer") or {}).get("vocab_size")
    bound = int(manifest["vocab_size"])
    if width not in (tokens, bound):
        raise FormatError(f"{where}: the student's logits are {width} wide, but the labels' tokenizer has {tokens} tokens "
                          f"(ids below {bound}); pass the student's tokenizer (processing_class=...) to check that it is "
                          "the labels' one, or use a student built for it")


def token_byte_lengths(tokenizer, width: int) -> np.ndarray:
    """[width] float32: bytes of each token id's text (0 for special tokens and
    padding slots): with them evaluation reports bits per byte (eval_bpb)."""
    from student_train.xtok import token_bytes
    lengths = np.zeros(width, np.float32)
    pieces = token_bytes(tokenizer)[:width]
    lengths[:len(pieces)] = [len(p) for p in pieces]
    return lengths


def check_loss_fits_labels(cfg: TrainConfig, kind: str, stored_k: int) -> int:
    if cfg.loss == "kd" and kind not in ("topk", "sampled", "scored"):
        raise FormatError(f"--loss kd needs topk, sampled or scored labels; {cfg.labels[0]} holds {kind} "
                          f"(use --loss {'sft' if kind == 'samples' else 'ce'})")
    if cfg.loss == "opd" and kind != "scored":
        raise FormatError(f"--loss opd needs scored labels (the student's completions scored by the teacher: "
                          f"labelgen generate --mode score); {cfg.labels[0]} holds {kind}")
    if cfg.student_tokenizer and kind not in ("topk", "tokens"):
        raise FormatError(f"--student-tokenizer: cross-tokenizer training reads topk labels (or tokens, for CE); "
                          f"{cfg.labels[0]} holds {kind}")
    if cfg.loss == "sft" and kind not in ("samples", "scored"):
        raise FormatError(f"--loss sft needs samples or scored labels (completions); {cfg.labels[0]} holds {kind}")
    k = cfg.k or stored_k
    if cfg.k and kind == "sampled":
        raise FormatError("--k applies to topk labels; sampled labels are used as drawn")
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


def student_logits(model, batch: dict) -> torch.Tensor:
    """[B, T-1, V]: the logits that predict each next token."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]


def loss_step(model, batch: dict, cfg: TrainConfig, alpha: float = 1.0, logits: torch.Tensor | None = None,
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


def opd_objective(logits: torch.Tensor, batch: dict, cfg: TrainConfig, lse: torch.Tensor, stats: dict) -> torch.Tensor:
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


def micro_step(models: dict, batch: dict, alpha: float, backward, *, cfg: TrainConfig) -> dict:
    """One micro-batch: alpha * CE + (1 - alpha) * KD (or the opd objective), back-propagated."""
    stats: dict = {}
    ce, kd = loss_step(models["student"], batch, cfg, alpha, stats=stats)
    objective = ce if alpha == 1 else kd if alpha == 0 else alpha * ce + (1 - alpha) * kd
    backward(objective)
    return {"loss": objective, "ce": ce, "kd": kd, **stats}


def score(models: dict, batch: dict) -> dict:
    """Held-out CE on actual tokens and the calibration bins (eval_ece); for
    topk labels also KL(teacher||student) over the top-k plus tail bucket and
    top-1 agreement with the teacher."""
    logits = student_logits(models["student"], batch)
    lse = losses.logsumexp_chunked(logits)
    out = {"ce": losses.cross_entropy(logits, batch["targets"], batch["mask"], lse=lse)}
    out.update(losses.calibration_metrics(logits, batch["targets"], batch["mask"], lse=lse))
    if "topk_ids" in batch:
        kd_mask = batch.get("kd_mask", batch["mask"])
        out["kl"] = losses.topk_kd(logits, batch["topk_ids"], batch["topk_logprobs"], batch["coverage"],
                                   kd_mask, tail="tail", lse=lse)
        out["top1"] = losses.topk_agreement(logits, batch["topk_ids"], batch["topk_logprobs"], kd_mask)
    if "target_bytes" in batch:   # bytes per counted token: with ce, bits per byte (runtime.evaluate)
        out["bytes"] = losses.masked_mean(batch["target_bytes"], batch["mask"])
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
                  loss=functools.partial(micro_step, cfg=cfg), score=score, tokenizer=tokenizer,
                  check_resume=check_resume, desc="student-train",
                  meta={"config": cfg.to_dict(), "labels_fingerprints": fingerprints,
                        "tokenizer": fmt.tokenizer_fingerprint(tokenizer)["fingerprint"]})
        return fit(cfg, d, run, rd, ckpt)
