"""Train a student on label shards: `student-train train --labels DIR ...`.

Reads top to bottom: setup (distributed, data, student, optimizer, resume),
then `while step < max_steps`: micro-steps with gradient accumulation, an
optimizer step, logging, evaluation and checkpoints. Runs as one process or
under torchrun (DDP; gloo on CPU, nccl on GPU; FSDP with --fsdp).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from labelgen import format as fmt
from labelgen.format import FormatError
from student_train import losses
from student_train.checkpoint import latest_checkpoint, load_states, load_weights, save_checkpoint
from student_train.config import TrainConfig
from student_train.data import LabelStream, LoaderState, holdout_split, open_label_sets, take_batches


# ---------------------------------------------------------------- setup helpers (shared with codistill)


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Join the torchrun group if there is one (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(int(os.environ.get("RANK", "0")), world, local, dev)


def load_tokenizer_for(student: str | None, label_dir: Path):
    """The student's own tokenizer if its directory has one, else the labels'."""
    from transformers import AutoTokenizer
    for where in ([Path(student)] if student else []) + [Path(label_dir) / fmt.TOKENIZER_DIR]:
        if (where / "tokenizer_config.json").is_file() or (where / "tokenizer.json").is_file():
            try:
                return AutoTokenizer.from_pretrained(where, trust_remote_code=False)
            except (OSError, ValueError) as e:
                raise FormatError(f"{where}: cannot load the tokenizer ({e})") from None
    raise FormatError(f"{label_dir}: the labels carry no tokenizer ({fmt.TOKENIZER_DIR}/) and the student has none; "
                      "pass --student with a tokenizer")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def build_model(path: str | None, config_file: str | None, tokenizer, seed: int):
    """An HF causal LM from a directory, or built from scratch from a config JSON."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if path:
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"--student: {path} is not a model directory (no config.json)")
        try:
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
        except Exception as e:  # missing, partial or corrupt weights
            raise ValueError(f"--student: cannot load the model in {path} ({_first_line(e)})") from None
    try:
        d = json.loads(Path(config_file).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--student-config: cannot read {config_file} ({e})") from None
    if "model_type" not in d:
        raise ValueError(f"--student-config: {config_file} has no model_type (e.g. \"llama\")")
    d.setdefault("vocab_size", len(tokenizer))
    if d["vocab_size"] < len(tokenizer):
        raise ValueError(f"--student-config: vocab_size {d['vocab_size']} is smaller than the tokenizer's {len(tokenizer)}")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        d.setdefault(key, getattr(tokenizer, key))
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**d), dtype=torch.float32)


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
                          f"(differs in: {fmt.tokenizer_difference(labels_tok, student_tok)})")
    width = model.get_output_embeddings().weight.shape[0]
    if width < len(tokenizer):
        raise FormatError(f"{where}: the student's logits are {width} wide but its tokenizer has {len(tokenizer)} tokens")
    return width


def make_optimizer(model, lr: float, weight_decay: float, warmup: int, max_steps: int, min_lr_ratio: float):
    """AdamW (no decay on norms and biases) with linear warmup and cosine decay."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def wrap(model, d: Dist, fsdp: bool):
    """DDP (or FSDP2 with fsdp=True) when running under torchrun."""
    if d.world == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in getattr(model.base_model, "layers", []):
            fully_shard(layer)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def full_states(model, opt) -> tuple[dict, dict]:
    """Unsharded model and optimizer state of an FSDP model, on the CPU
    (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, opt, options=options)


def autocast(d: Dist, dtype: str):
    if d.device.type == "cuda" and dtype in ("auto", "bfloat16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_token_mean(model, tokens: int, d: Dist) -> None:
    """Gradient accumulation by tokens: each micro-batch back-propagates its
    mean loss times its counted positions; before the optimizer step this
    divides the summed gradients by the `tokens` counted since the last step
    on all ranks (DDP and FSDP average over ranks, hence x world). A short or
    heavily masked micro-batch then weighs by its tokens, not as much as a
    full one. train and codistill both step through it."""
    (total,) = all_reduce_sum([tokens], d.device) if d.world > 1 else (tokens,)
    scale = d.world / max(total, 1)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(scale)


def prepare_out_dir(out: Path, resume: bool, overwrite: bool, main: bool) -> Path | None:
    """Returns the checkpoint to resume from, if any."""
    out = Path(out)
    ckpt = latest_checkpoint(out) if out.is_dir() else None
    # A run that failed before its first checkpoint left at most its metrics log: nothing to resume or lose.
    started = out.is_dir() and any(p.name != METRICS_FILE for p in out.iterdir())
    if started and not (resume or overwrite):
        raise ValueError(f"--out: {out} is not empty; pass --resume to continue the run or --overwrite to start over"
                         + (f" (this deletes its checkpoints up to {ckpt.name})" if ckpt else ""))
    if overwrite and main and out.is_dir():
        import shutil
        shutil.rmtree(out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    return ckpt if resume else None


METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """OUT/metrics.jsonl, one JSON object per line (rank 0 only). On resume
    the lines after the checkpoint's step are dropped: they are redone."""

    def __init__(self, path: Path, main: bool, resume_step: int | None):
        self.path, self.main = Path(path), main
        if main:
            fmt.refuse_symlink(self.path)
        if main and resume_step is not None and self.path.exists():
            kept = [l for l in self.path.read_text().splitlines() if l and _step_of(l, self.path) <= resume_step]
            fmt.atomic_write_bytes(self.path, ("\n".join(kept) + "\n" if kept else "").encode())
        elif main and resume_step is None:
            self.path.write_text("")

    def write(self, record: dict) -> None:
        if self.main:
            fmt.refuse_symlink(self.path)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _step_of(line: str, path: Path) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: not a metrics log (a line without a step); move it away to resume") from None


def gather_loader_state(state: LoaderState) -> dict:
    """Every rank's consumer positions, merged (collective under torchrun)."""
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, state.state_dict())
        merged = LoaderState.from_dict(parts[0])
        for p in parts[1:]:
            merged.merge(LoaderState.from_dict(p))
        return merged.state_dict()
    return state.state_dict()


def gather_weight_digests(model) -> list[str]:
    """Every rank's sha256 of its parameters: equal digests mean the replicas agree."""
    import hashlib
    h = hashlib.sha256()
    for _, p in sorted(model.state_dict().items()):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        h.update(full.detach().float().cpu().numpy().tobytes())
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, h.hexdigest()[:16])
    return parts


def checkpoint(out: Path, step: int, d: Dist, tracker: LoaderState, models: dict, opts: dict, scheds: dict,
               tokenizer, meta: dict, full: dict | None = None) -> None:
    """Every rank's loader positions gathered, rank 0 saves, the others wait."""
    loader_state = gather_loader_state(tracker)
    if d.main:
        save_checkpoint(out, step, models, opts, scheds, tokenizer, loader_state, meta, full)
    if dist.is_initialized():
        dist.barrier()


def finish(bar, step: int, out: Path) -> dict:
    if bar is not None:
        bar.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return {"step": step, "out": str(out)}


def all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------- the losses of one micro-batch


def loss_step(model, batch: dict, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce, kd) per counted position. ce is on the actual next tokens (or the
    teacher's completion, prompt masked); kd is top-k KD, 0 unless loss=kd."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    ce = losses.cross_entropy(logits, batch["targets"], batch["mask"])
    if cfg.loss != "kd":
        return ce, torch.zeros_like(ce)
    if "sampled_ids" in batch:
        return ce, losses.sampled_kd(logits, batch["sampled_ids"], batch["sampled_weights"], batch["mask"],
                                     temperature=cfg.temperature)
    kd = losses.topk_kd(logits, batch["topk_ids"], batch["topk_logprobs"], batch["coverage"], batch["mask"],
                        kind=cfg.kd_kind, tail=cfg.tail, temperature=cfg.temperature, beta=cfg.beta)
    return ce, kd


@torch.no_grad()
def evaluate(model, batches, d: Dist, dtype: str) -> dict:
    """Held-out CE on actual tokens; for topk labels also KL(teacher||student)
    over the top-k plus tail bucket and top-1 agreement with the teacher."""
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0]   # ce, kl, top1 (position-weighted), positions
    has_topk = False
    for batch in batches:
        batch = {k: v.to(d.device) for k, v in batch.items()}
        with autocast(d, dtype):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        n = batch["mask"].sum().item()
        sums[0] += losses.cross_entropy(logits, batch["targets"], batch["mask"]).item() * n
        if "topk_ids" in batch:
            has_topk = True
            sums[1] += losses.topk_kd(logits, batch["topk_ids"], batch["topk_logprobs"], batch["coverage"],
                                      batch["mask"], tail="tail").item() * n
            sums[2] += losses.topk_agreement(logits, batch["topk_ids"], batch["mask"]).item() * n
        sums[3] += n
    model.train()
    ce, kl, top1, n = all_reduce_sum(sums, d.device)
    out = {"eval_ce": ce / max(n, 1)}
    if has_topk:
        out.update(eval_kl=kl / max(n, 1), eval_top1=top1 / max(n, 1))
    return out


def check_loss_fits_labels(cfg: TrainConfig, kind: str, stored_k: int) -> int:
    if cfg.loss == "kd" and kind not in ("topk", "sampled"):
        raise FormatError(f"--loss kd needs topk or sampled labels; {cfg.labels[0]} holds {kind} "
                          f"(use --loss {'sft' if kind == 'samples' else 'ce'})")
    if cfg.loss == "sft" and kind != "samples":
        raise FormatError(f"--loss sft needs samples labels (teacher completions); {cfg.labels[0]} holds {kind}")
    k = cfg.k or stored_k
    if cfg.k and kind == "sampled":
        raise FormatError("--k applies to topk labels; sampled labels are used as drawn")
    if kind == "topk" and k > stored_k:
        raise FormatError(f"--k {k} is larger than the {stored_k} entries the labels hold")
    return k


# ---------------------------------------------------------------- the training loop


def train(cfg: TrainConfig) -> dict:
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()   # checkpoint saves would print bars of their own
    d = setup_distributed(cfg.device)
    readers = open_label_sets(list(cfg.labels), cfg.verify)
    manifest = readers[0].manifest
    if sum(r.manifest["counts"]["positions"] for r in readers) == 0:
        raise FormatError(f"--labels: {', '.join(cfg.labels)} hold no positions to train on (empty, or every completion is empty)")
    k = check_loss_fits_labels(cfg, readers[0].kind, readers[0].k)
    tokenizer = load_tokenizer_for(cfg.student, readers[0].dir)
    model = build_model(cfg.student, cfg.student_config, tokenizer, cfg.seed)
    width = check_vocabulary(manifest, tokenizer, model, str(readers[0].dir))
    train_shards, eval_shards = holdout_split(readers, cfg.eval_holdout)
    stream = LabelStream(readers, cfg.batch_size, seed=cfg.seed, group_units=cfg.group_units, rank=d.rank,
                         world_size=d.world, k=k, vocab_limit=width, shards=train_shards)
    eval_stream = None
    if cfg.eval_labels or eval_shards:
        eval_readers = open_label_sets(list(cfg.eval_labels), cfg.verify) if cfg.eval_labels else readers
        for r in eval_readers:
            check_vocabulary(r.manifest, tokenizer, model, str(r.dir))
        eval_stream = LabelStream(eval_readers, cfg.batch_size, shuffle=False, rank=d.rank, world_size=d.world,
                                  k=None, vocab_limit=width, shards=None if cfg.eval_labels else eval_shards)

    out = Path(cfg.out)
    ckpt = prepare_out_dir(out, cfg.resume, cfg.overwrite, d.main)
    if ckpt is not None:
        load_weights(ckpt, {"student": model})
    model.to(d.device)
    ddp_model = wrap(model, d, cfg.fsdp)
    # Created after wrapping: FSDP replaces the parameters with sharded ones.
    opt, sched = make_optimizer(ddp_model, cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    fsdp = cfg.fsdp and dist.is_initialized()
    step = 0
    if ckpt is not None:
        meta, loader_state = load_states(ckpt, {"student": opt}, {"student": sched},
                                         {"student": ddp_model} if fsdp else None)
        if meta.get("labels_fingerprints") != [r.manifest["fingerprint"] for r in readers]:
            raise FormatError(f"--resume: {ckpt} was trained on other labels (fingerprints differ)")
        step = int(meta["step"])
        stream.load_state_dict(loader_state)
    log = MetricsLog(out / METRICS_FILE, d.main, step if ckpt is not None else None)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.num_workers,
                                         persistent_workers=cfg.num_workers > 0)
    batches = iter(loader)
    tracker = LoaderState()
    meta_base = {"config": cfg.to_dict(), "labels_fingerprints": [r.manifest["fingerprint"] for r in readers],
                 "tokenizer": manifest["tokenizer"]["fingerprint"]}

    bar = None
    if cfg.progress and d.main:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, initial=step, unit="step", desc="student-train", dynamic_ncols=True)
    if eval_stream is not None and ckpt is None:
        log.write({"step": 0, "loss": None,
                   **evaluate(ddp_model, take_batches(eval_stream, cfg.eval_batches), d, cfg.dtype)})

    t0, tokens = time.time(), 0
    while step < cfg.max_steps:
        alpha = 1.0 if cfg.loss != "kd" else losses.alpha_at(step, cfg.max_steps, cfg.alpha, cfg.alpha_end)
        opt.zero_grad(set_to_none=True)
        ce_sum = kd_sum = torch.zeros((), device=d.device)   # summed on the device: no sync per micro-step
        step_tokens = 0
        for micro in range(cfg.grad_accum):
            batch, meta = next(batches)
            tracker.update(meta)
            n = int(batch["mask"].sum())   # still on the host
            step_tokens += n
            batch = {key: v.to(d.device, non_blocking=True) for key, v in batch.items()}
            sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 or d.world == 1 or cfg.fsdp \
                else ddp_model.no_sync()
            with sync, autocast(d, cfg.dtype):
                ce, kd = loss_step(ddp_model, batch, cfg)
                loss = (alpha * ce + (1 - alpha) * kd) * n
                loss.backward()
            ce_sum = ce_sum + ce.detach() * n
            kd_sum = kd_sum + kd.detach() * n
        tokens += step_tokens
        ce_sum, kd_sum = ce_sum / max(step_tokens, 1), kd_sum / max(step_tokens, 1)
        to_token_mean(ddp_model, step_tokens, d)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1

        last = step == cfg.max_steps
        evaluating = eval_stream is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or last)
        if step % cfg.log_every == 0 or evaluating or last:
            ce_v, kd_v = ce_sum.item(), kd_sum.item()
            record = {"step": step, "loss": alpha * ce_v + (1 - alpha) * kd_v, "ce": ce_v, "kd": kd_v,
                      "alpha": alpha, "lr": sched.get_last_lr()[0],
                      "tokens_per_s": tokens * d.world / max(time.time() - t0, 1e-9)}
            if evaluating:
                record.update(evaluate(ddp_model, take_batches(eval_stream, cfg.eval_batches), d, cfg.dtype))
            if last and dist.is_initialized():
                record["weight_digests"] = gather_weight_digests(model)
            log.write(record)
            if bar is not None:
                bar.set_postfix_str(f"loss {record['loss']:.3f}", refresh=False)
        if bar is not None:
            bar.update(1)
        if (cfg.save_every and step % cfg.save_every == 0) or last:
            full = {"student": full_states(ddp_model, opt)} if fsdp else None
            checkpoint(out, step, d, tracker, {"student": model}, {"student": opt}, {"student": sched}, tokenizer,
                       meta_base, full)
    return finish(bar, step, out)
