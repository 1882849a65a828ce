"""Train a student on label shards: `student-train train --labels DIR ...`.

Reads top to bottom: what the labels need of the loss, one micro-batch (its
objective and the held-out score are objective.py's; the student's fit to the
labels, vocab.py's), then `train`: open the labels, build the student and hand both
to the shared loop (`runtime.fit`: gradient accumulation, DDP/FSDP under torchrun,
logging, evaluation, checkpoints and exact resume).
"""

from __future__ import annotations

import functools
from pathlib import Path

from labelgen import format as fmt
from labelgen.format import FormatError
from student_train.config import TrainConfig
from student_train.data import LabelStream, holdout_split, open_label_sets
from student_train.objective import check_labels, loss_step, score
from student_train.runtime import Run, build_model, fit, run_dir, setup_distributed, training_run
from student_train.vocab import check_vocabulary, check_width, load_tokenizer_for, token_byte_lengths
from student_train.xtok import CANDIDATE_MAPS

TRAIN = training_run("training run", *CANDIDATE_MAPS)


# ---------------------------------------------------------------- one micro-batch, one held-out batch


def micro_step(models: dict, batch: dict, alpha: float, backward, *, cfg: TrainConfig) -> dict:
    """One micro-batch: alpha * CE + (1 - alpha) * KD (or the opd objective), back-propagated."""
    out = loss_step(models["student"], batch, cfg, alpha)
    backward(out["objective"])
    return {"loss": out.pop("objective"), **out}


# ---------------------------------------------------------------- the command


def train(cfg: TrainConfig) -> dict:
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()   # checkpoint saves would print bars of their own
    d = setup_distributed(cfg.device)
    readers = open_label_sets(list(cfg.labels), cfg.verify)
    manifest = readers[0].manifest
    if sum(r.manifest["counts"]["positions"] for r in readers) == 0:
        raise FormatError(f"--labels: {', '.join(cfg.labels)} hold no positions to train on (empty, or every completion is empty)")
    k = check_labels(cfg, readers, k=cfg.k, cross=bool(cfg.student_tokenizer))
    cross = None
    if cfg.student_tokenizer:   # cross-tokenizer: the student reads its own tokenization of the labelled text
        tokenizer = load_tokenizer_for(None, Path(cfg.student_tokenizer), "--student-tokenizer")
        model = build_model(cfg.student, cfg.student_config, tokenizer, cfg.seed)
        width = check_width(model, tokenizer, "--student-tokenizer")
    else:
        tokenizer = load_tokenizer_for(cfg.student, readers[0].dir)
        model = build_model(cfg.student, cfg.student_config, tokenizer, cfg.seed)
        width = check_vocabulary(manifest, tokenizer, model, str(readers[0].dir))
    with run_dir(cfg, d, TRAIN) as (rd, ckpt):
        if cfg.student_tokenizer:
            from student_train.xtok import CrossTokenizer
            cross = CrossTokenizer(load_tokenizer_for(None, readers[0].dir), tokenizer, rd.local if d.main else None)
        train_shards, eval_shards = holdout_split(readers, cfg.eval_holdout)
        stream = LabelStream(readers, cfg.batch_size, seed=cfg.seed, group_units=cfg.group_units, rank=d.rank,
                             world_size=d.world, k=k, vocab_limit=width, shards=train_shards, cross=cross,
                             assistant_only=cfg.assistant_only)
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
                                      cross=cross, byte_lengths=None if cross else token_byte_lengths(tokenizer, width),
                                      assistant_only=cfg.assistant_only)
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
