"""Co-distillation: `student-train codistill --input corpus/ ...` trains a
teacher and a student together on the same batches.

Each step runs the teacher once: its CE on the actual tokens trains it, and
its logits from that same forward (detached) are the student's soft labels.
The student's loss is alpha(t)*CE + (1 - alpha(t))*KD, with alpha(t) = 1 for
the first steps (an untrained teacher's labels are noise) and then a ramp to
the target alpha. Data, losses, checkpoints and the distributed setup are the
training stage's: the corpus is tokenized once into OUT/data as a `tokens`
label set and streamed by the same loader.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from labelgen import format as fmt
from labelgen.format import FormatError
from student_train import losses
from student_train.checkpoint import load_checkpoint
from student_train.config import CodistillConfig
from student_train.data import LabelStream, LoaderState, open_label_sets, take_batches
from student_train.train import (MetricsLog, all_reduce_sum, autocast, build_model, checkpoint, finish,
                                 gather_weight_digests, make_optimizer, prepare_out_dir, setup_distributed,
                                 to_token_mean, wrap)


def alpha_at(step: int, cfg: CodistillConfig) -> float:
    """1 for alpha_warmup_steps, then linear or cosine to cfg.alpha over alpha_ramp_steps."""
    if step < cfg.alpha_warmup_steps:
        return 1.0
    if cfg.alpha_ramp_steps == 0 or step >= cfg.alpha_warmup_steps + cfg.alpha_ramp_steps:
        return cfg.alpha
    frac = (step - cfg.alpha_warmup_steps) / cfg.alpha_ramp_steps
    if cfg.alpha_schedule == "cosine":
        frac = 0.5 * (1 - math.cos(math.pi * frac))
    return 1.0 + (cfg.alpha - 1.0) * frac


def shared_tokenizer(cfg: CodistillConfig):
    """The one tokenizer both models use; refuse models whose tokenizers differ."""
    from transformers import AutoTokenizer
    found = {}
    for name, where in (("--tokenizer", cfg.tokenizer), ("--teacher", cfg.teacher), ("--student", cfg.student)):
        if where and any((Path(where) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            found[name] = (where, AutoTokenizer.from_pretrained(where, trust_remote_code=False))
    if not found:
        raise ValueError("--tokenizer: no tokenizer found; pass --tokenizer DIR")
    (first, (path, tok)), *others = found.items()
    fp = fmt.tokenizer_fingerprint(tok)
    for name, (other_path, other) in others:
        ofp = fmt.tokenizer_fingerprint(other)
        if ofp["fingerprint"] != fp["fingerprint"]:
            raise ValueError(f"{name} {other_path} and {first} {path} have different tokenizers "
                             f"(differ in: {fmt.tokenizer_difference(fp, ofp)})")
    return path, tok


def tokenize_corpus(inputs: tuple[str, ...], out: Path, tokenizer_dir: str, cfg: CodistillConfig) -> Path:
    """Tokenize raw text into a `tokens` label set once; later runs reuse it."""
    from labelgen.config import GenerateConfig
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
            raise ValueError(f"--{name}: its logits are {width} wide but the shared tokenizer has {n} tokens")
    return n


def kd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, mask: torch.Tensor, cfg: CodistillConfig) -> torch.Tensor:
    """The training stage's losses against the teacher's live distribution:
    all of it (full) or its top-k only (as offline labels would keep)."""
    if cfg.kd == "full":
        return losses.full_kd(s_logits, t_logits, mask, kind=cfg.kd_kind, temperature=cfg.temperature, beta=cfg.beta)
    t_lp = torch.log_softmax(t_logits.float(), dim=-1)
    top = t_lp.topk(cfg.k, dim=-1)
    return losses.topk_kd(s_logits, top.indices, top.values, top.values.exp().sum(-1), mask, kind=cfg.kd_kind,
                          tail=cfg.tail, temperature=cfg.temperature, beta=cfg.beta)


@torch.no_grad()
def evaluate(teacher, student, batches, d, cfg: CodistillConfig, n_vocab: int) -> dict:
    teacher.eval(), student.eval()
    sums = [0.0, 0.0, 0.0, 0.0]   # teacher ce, student ce, kl, positions
    for batch in batches:
        batch = {k: v.to(d.device) for k, v in batch.items()}
        with autocast(d, cfg.dtype):
            t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :n_vocab]
            s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :n_vocab]
        n = batch["mask"].sum().item()
        sums[0] += losses.cross_entropy(t, batch["targets"], batch["mask"]).item() * n
        sums[1] += losses.cross_entropy(s, batch["targets"], batch["mask"]).item() * n
        sums[2] += losses.full_kd(s, t, batch["mask"]).item() * n
        sums[3] += n
    teacher.train(), student.train()
    t_ce, s_ce, kl, n = all_reduce_sum(sums, d.device)
    n = max(n, 1)
    return {"teacher_eval_ce": t_ce / n, "student_eval_ce": s_ce / n, "eval_kl": kl / n}


def forward_backward(t_model, s_model, batch: dict, alpha: float, cfg: CodistillConfig, n_vocab: int,
                     frozen: bool, d, tokens: int) -> tuple[torch.Tensor, ...]:
    """One batch: the teacher's forward and CE backward, then the student's
    loss against the same (detached) teacher logits. Returns (teacher CE,
    student CE, KD, student loss). Gradients are summed over the batch's
    `tokens` counted positions; _optimizer_step divides by the step's total."""
    with autocast(d, cfg.dtype), (torch.no_grad() if frozen else contextlib.nullcontext()):
        t_logits = t_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :n_vocab]
        t_ce = losses.cross_entropy(t_logits, batch["targets"], batch["mask"])
        if not frozen:
            (t_ce * tokens).backward()
    with autocast(d, cfg.dtype):
        s_logits = s_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :n_vocab]
        s_ce = losses.cross_entropy(s_logits, batch["targets"], batch["mask"])
        kd = kd_loss(s_logits, t_logits.detach(), batch["mask"], cfg) if alpha < 1 else torch.zeros_like(s_ce)
        s_loss = alpha * s_ce + (1 - alpha) * kd
        (s_loss * tokens).backward()
    return t_ce, s_ce, kd, s_loss


def _optimizer_step(model, opt, sched, clip: float, tokens: int, d) -> None:
    """Step on the mean gradient over the `tokens` counted since the last step."""
    to_token_mean(model, tokens, d)
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def codistill(cfg: CodistillConfig) -> dict:
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    d = setup_distributed(cfg.device)
    tok_dir, tokenizer = shared_tokenizer(cfg)
    teacher = build_model(cfg.teacher, cfg.teacher_config, tokenizer, cfg.seed + 1)
    student = build_model(cfg.student, cfg.student_config, tokenizer, cfg.seed)
    n_vocab = check_widths(teacher, student, tokenizer)
    out = Path(cfg.out)
    ckpt = prepare_out_dir(out, cfg.resume, cfg.overwrite, d.main)
    if d.main:
        tokenize_corpus(cfg.inputs, out / "data", tok_dir, cfg)
        if cfg.eval_input:
            tokenize_corpus(cfg.eval_input, out / "eval_data", tok_dir, cfg)
    if dist.is_initialized():
        dist.barrier()
    readers = open_label_sets([str(out / "data")])
    stream = LabelStream(readers, cfg.batch_size, seed=cfg.seed, group_units=cfg.group_units, rank=d.rank,
                         world_size=d.world)
    eval_stream = None
    if cfg.eval_input:
        eval_stream = LabelStream(open_label_sets([str(out / "eval_data")]), cfg.batch_size, shuffle=False,
                                  rank=d.rank, world_size=d.world)

    teacher.to(d.device), student.to(d.device)
    frozen = cfg.teacher_lr == 0   # a fixed teacher: online KD, no teacher backward at all
    # Each schedule counts its model's optimizer steps: one per grad_accum batches.
    t_opt, t_sched = make_optimizer(teacher, cfg.teacher_lr, cfg.weight_decay, -(-cfg.warmup_steps // cfg.teacher_grad_accum),
                                    cfg.max_steps // cfg.teacher_grad_accum, cfg.min_lr_ratio)
    s_opt, s_sched = make_optimizer(student, cfg.student_lr, cfg.weight_decay, -(-cfg.warmup_steps // cfg.student_grad_accum),
                                    cfg.max_steps // cfg.student_grad_accum, cfg.min_lr_ratio)
    models, opts, scheds = {"teacher": teacher, "student": student}, {"teacher": t_opt, "student": s_opt}, \
        {"teacher": t_sched, "student": s_sched}
    step = 0
    if ckpt is not None:
        meta, loader_state = load_checkpoint(ckpt, models, opts, scheds)
        if meta.get("data_fingerprint") != readers[0].manifest["fingerprint"]:
            raise FormatError(f"--resume: {ckpt} was trained on another corpus (fingerprints differ)")
        step = int(meta["step"])
        stream.load_state_dict(loader_state)
    t_model = teacher if frozen else wrap(teacher, d, False)
    s_model = wrap(student, d, False)
    log = MetricsLog(out / "metrics.jsonl", d.main, step if ckpt is not None else None)
    batches = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.num_workers,
                                               persistent_workers=cfg.num_workers > 0))
    tracker = LoaderState()
    meta_base = {"config": cfg.to_dict(), "data_fingerprint": readers[0].manifest["fingerprint"],
                 "tokenizer": fmt.tokenizer_fingerprint(tokenizer)["fingerprint"]}

    bar = None
    if cfg.progress and d.main:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, initial=step, unit="step", desc="codistill", dynamic_ncols=True)
    if eval_stream is not None and ckpt is None:
        log.write({"step": 0, "loss": None,
                   **evaluate(t_model, s_model, take_batches(eval_stream, cfg.eval_batches), d, cfg, n_vocab)})

    t0, start = time.time(), step
    t_tokens = s_tokens = 0   # counted positions since each model's last optimizer step
    while step < cfg.max_steps:
        alpha = alpha_at(step, cfg)
        batch, meta = next(batches)
        tracker.update(meta)
        tokens = int(batch["mask"].sum())
        t_tokens, s_tokens = t_tokens + tokens, s_tokens + tokens
        batch = {key: v.to(d.device, non_blocking=True) for key, v in batch.items()}
        t_step = (step + 1) % cfg.teacher_grad_accum == 0
        s_step = (step + 1) % cfg.student_grad_accum == 0
        t_sync = contextlib.nullcontext() if t_step or frozen or d.world == 1 else t_model.no_sync()
        s_sync = contextlib.nullcontext() if s_step or d.world == 1 else s_model.no_sync()
        with t_sync, s_sync:
            t_ce, s_ce, kd, s_loss = forward_backward(t_model, s_model, batch, alpha, cfg, n_vocab, frozen, d, tokens)
        if t_step and not frozen:
            _optimizer_step(t_model, t_opt, t_sched, cfg.grad_clip, t_tokens, d)
            t_tokens = 0
        if s_step:
            _optimizer_step(s_model, s_opt, s_sched, cfg.grad_clip, s_tokens, d)
            s_tokens = 0
        step += 1

        record = {"step": step, "loss": s_loss.item(), "student_ce": s_ce.item(), "kd": kd.item(),
                  "teacher_ce": t_ce.item(), "alpha": alpha, "steps_per_s": (step - start) / max(time.time() - t0, 1e-9)}
        last = step == cfg.max_steps
        if eval_stream is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
            record.update(evaluate(t_model, s_model, take_batches(eval_stream, cfg.eval_batches), d, cfg,
                                   n_vocab))
        if last and dist.is_initialized():
            record["weight_digests"] = gather_weight_digests(student) + gather_weight_digests(teacher)
        if step % cfg.log_every == 0 or "student_eval_ce" in record or last:
            log.write(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"student {record['student_ce']:.3f} teacher {record['teacher_ce']:.3f}", refresh=False)
        if (cfg.save_every and step % cfg.save_every == 0) or last:
            checkpoint(out, step, d, tracker, models, opts, scheds, tokenizer, meta_base)
    return finish(bar, step, out)
