"""The training runtime `train` and `codistill` share: distributed setup,
models, optimizer and schedule, metrics log, checkpoints, evaluation, and
`fit`, the one training loop.

A command builds its models and data, then hands `fit` a `Run`: the models
(by name, "student" first), their learning rates, the streams, and two
functions — `loss` (one micro-batch: back-propagates its objectives and
returns the metrics to log) and `score` (one held-out batch: the metrics to
average).
Everything else — gradient accumulation weighted by counted tokens, DDP or
FSDP, the LR schedule over optimizer steps, logging, evaluation, exact
resume — happens here, the same way for both commands.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from labelgen.backends import not_a_model
from labelgen.errors import OptionError, one_line
from labelgen.run.rundir import RunDir, RunKind
from labelgen.stopping import StopFlag
from labelgen.store import fsutil, storage
from student_train import losses
from student_train import checkpoint
from student_train.checkpoint import latest_checkpoint, load_states, load_weights, save_checkpoint
from student_train.data import LabelStream, LoaderState, take_batches


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str, local_rank: int, cuda: bool) -> torch.device:
    """auto: this rank's GPU if there is one, else the CPU; a bare "cuda" is
    this rank's GPU too (torch.cuda.set_device needs an index)."""
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    dev = torch.device(device)
    return torch.device("cuda", local_rank) if dev.type == "cuda" and dev.index is None else dev


def setup_distributed(device: str) -> Dist:
    """Join the torchrun group if there is one (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local, torch.cuda.is_available())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(int(os.environ.get("RANK", "0")), world, local, dev)


def build_model(path: str | None, config_file: str | None, tokenizer, seed: int):
    """An HF causal LM from a directory, or built from scratch from a config JSON."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if path:
        if not (Path(path) / "config.json").is_file():
            raise not_a_model("--student", path)
        try:
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
        except Exception as e:  # missing, partial or corrupt weights
            raise OptionError(f"--student: cannot load the model in {path} ({one_line(e)})") from None
    try:
        d = json.loads(storage.read_text(config_file, 1 << 20))
    except (OSError, ValueError) as e:
        raise OptionError(f"--student-config: cannot read {config_file} ({e})") from None
    if "model_type" not in d:
        raise OptionError(f"--student-config: {config_file} has no model_type (e.g. \"llama\")")
    d.setdefault("vocab_size", len(tokenizer))
    if d["vocab_size"] < len(tokenizer):
        raise OptionError(f"--student-config: vocab_size {d['vocab_size']} is smaller than the tokenizer's {len(tokenizer)}")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        d.setdefault(key, getattr(tokenizer, key))
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**d), dtype=torch.float32)


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


METRICS_FILE = "metrics.jsonl"


def training_run(name: str, *also: str) -> RunKind:
    """What a training command writes in its output: checkpoints, the metrics
    log, and `also` (the names the command itself writes there)."""
    return RunKind(name, (checkpoint.CHECKPOINTS, METRICS_FILE) + also, marker=(checkpoint.CHECKPOINTS,),
                   harmless=(METRICS_FILE,), unit="checkpoint", unit_pattern=checkpoint.CHECKPOINTS)


@contextlib.contextmanager
def run_dir(cfg, d: Dist, kind: RunKind):
    """The run's output (a directory or a bucket prefix staged locally:
    labelgen/run/rundir.py), held by rank 0 for the whole run; yields it and
    the checkpoint to resume from (None when the run starts afresh)."""
    with RunDir(cfg.out, kind, main=d.main) as rd:
        rd.claim(cfg.resume, cfg.overwrite)
        checkpoint.pull(rd, cfg.resume, (METRICS_FILE,))
        if dist.is_initialized():
            dist.barrier()
        yield rd, latest_checkpoint(rd.local) if cfg.resume else None


class MetricsLog:
    """OUT/metrics.jsonl, one JSON object per line (rank 0 only). On resume
    the lines after the checkpoint's step are dropped: they are redone."""

    def __init__(self, path: Path, main: bool, resume_step: int | None):
        self.path, self.main = Path(path), main
        if main:
            fsutil.refuse_symlink(self.path)
        if main and resume_step is not None and self.path.exists():
            lines = [l for l in storage.read_text(self.path, errors="replace").splitlines() if l.strip()]
            if lines and _step_of(lines[-1], self.path, torn_ok=True) is None:
                lines.pop()   # a crash in the middle of writing it tore the last line
            kept = [l for l in lines if _step_of(l, self.path) <= resume_step]
            fsutil.atomic_write_bytes(self.path, ("\n".join(kept) + "\n" if kept else "").encode())
        elif main and resume_step is None:
            storage.write_bytes(self.path, b"")

    def write(self, record: dict) -> None:
        if self.main:
            fsutil.refuse_symlink(self.path)
            storage.append_text(self.path, json.dumps(record) + "\n")


def _step_of(line: str, path: Path, torn_ok: bool = False) -> int | None:
    """The step a metrics line records; a bad line is refused (None with torn_ok)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        if torn_ok:
            return None
        raise OptionError(f"{path}: not a metrics log (a line without a step); move it away to resume") from None


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


def all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()

def to_token_mean(models: list, total: float, d: Dist) -> None:
    """Gradient accumulation by tokens: each micro-batch back-propagates its
    mean loss times its counted positions; before the optimizer step this
    divides the summed gradients by the `total` tokens counted since the last
    step on all ranks (DDP and FSDP average over ranks, hence x world). A
    short or heavily masked micro-batch then weighs by its tokens, not as
    much as a full one."""
    for model in models:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(d.world / max(total, 1))

# ---------------------------------------------------------------- evaluation and the loop


@dataclasses.dataclass
class Run:
    """What a command hands the loop."""
    models: dict[str, torch.nn.Module]
    """Unwrapped models by name, all checkpointed; "student" first."""
    lrs: dict[str, float]
    """Peak learning rate of each model; 0 freezes it (not wrapped, never stepped)."""
    stream: LabelStream
    eval_stream: LabelStream | None
    loss: Callable[[dict, dict, float, Callable], dict[str, torch.Tensor]]
    """(wrapped models, batch, alpha, backward) -> metrics per counted position.
    It calls backward(objective) on each objective (per counted position) as
    soon as it has it, so a model's activations are freed before the next runs."""
    score: Callable[[dict, dict], dict[str, torch.Tensor]]
    """(models, held-out batch) -> metrics per counted position; logged with an eval_ prefix."""
    tokenizer: object
    meta: dict
    """Saved in every checkpoint's meta.json."""
    check_resume: Callable[[dict, Path], None]
    """Raises if a checkpoint's meta does not belong to this run's data."""
    desc: str


@torch.no_grad()
def evaluate(models: dict, score, batches, d: Dist, dtype: str) -> dict:
    """`score`'s metrics averaged over the counted positions of `batches` on all ranks, prefixed eval_."""
    for m in models.values():
        m.eval()
    sums, n = {}, 0
    for batch in batches:
        batch = {k: v.to(d.device) for k, v in batch.items()}
        with autocast(d, dtype):
            metrics = score(models, batch)
        tokens = int(batch["mask"].sum())
        n += tokens
        for key, v in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(v) * tokens
    for m in models.values():
        m.train()
    keys = sorted(sums)
    *totals, n = all_reduce_sum([sums[k] for k in keys] + [n], d.device)
    if n == 0:   # held-out labels that count no position (assistant-only labels of chats without an answer)
        return {"eval_positions": 0}   # no figure: a mean over nothing is not 0.0
    out = {f"eval_{k}": v / max(n, 1) for k, v in zip(keys, totals)}
    if "eval_bytes" in out and "eval_ce" in out:   # tokenizer-independent: total nats / (ln 2 x total bytes)
        out["eval_bpb"] = out["eval_ce"] / (math.log(2) * max(out["eval_bytes"], 1e-9))
    gaps = [out.pop(k) for k in sorted(out) if k.startswith("eval_" + losses.CALIBRATION_PREFIX)]
    if gaps:   # |accuracy - confidence| per bin is taken after averaging over all batches and ranks
        out["eval_ece"] = losses.expected_calibration_error(gaps)
    return out


def fit(cfg, d: Dist, run: Run, rd: RunDir, ckpt: Path | None) -> dict:
    """Train run.models for cfg.max_steps optimizer steps of cfg.grad_accum
    micro-batches each, writing into the run directory `rd` (run_dir),
    resuming from `ckpt` if given. A preemption signal (SIGTERM, SIGUSR1)
    ends the run after the step in progress, with a checkpoint of it.
    Returns {step, out, stopped_by: the signal's name or None, world}."""
    out = rd.local
    if ckpt is not None:
        load_weights(ckpt, run.models)
    trained = [name for name in run.models if run.lrs[name] > 0]
    wrapped = {}
    for name, model in run.models.items():
        model.to(d.device)
        wrapped[name] = wrap(model, d, cfg.fsdp) if name in trained else model
    # Created after wrapping: FSDP replaces the parameters with sharded ones.
    opts, scheds = {}, {}
    for name in run.models:
        opts[name], scheds[name] = make_optimizer(wrapped[name], run.lrs[name], cfg.weight_decay, cfg.warmup_steps,
                                                  cfg.max_steps, cfg.min_lr_ratio)
    fsdp = {name: wrapped[name] for name in trained} if cfg.fsdp and dist.is_initialized() else None
    step = 0
    if ckpt is not None:
        meta, loader_state = load_states(ckpt, opts, scheds, fsdp)
        run.check_resume(meta, ckpt)
        step = int(meta["step"])
        run.stream.load_state_dict(loader_state)
    log = MetricsLog(out / METRICS_FILE, d.main, step if ckpt is not None else None)
    batches = iter(torch.utils.data.DataLoader(run.stream, batch_size=None, num_workers=cfg.loader_workers,
                                               persistent_workers=cfg.loader_workers > 0))
    tracker = LoaderState()

    def held_out() -> dict:
        return evaluate(wrapped, run.score, take_batches(run.eval_stream, cfg.eval_batches), d, cfg.dtype)

    bar = None
    if cfg.progress and d.main:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, initial=step, unit="step", desc=run.desc, dynamic_ncols=True)
    if run.eval_stream is not None and ckpt is None:
        log.write({"step": 0, "loss": None, **held_out()})

    t0, tokens = time.time(), 0
    counted, first_epoch = 0, None   # a whole pass over the labels that counts nothing is refused
    stop = False
    with StopFlag() as preempt:
        while step < cfg.max_steps:
            alpha = cfg.ce_weight_at(step)
            for name in trained:
                opts[name].zero_grad(set_to_none=True)
            sums, step_tokens = {}, 0   # metric sums stay on the device: no sync per micro-step
            for micro in range(cfg.grad_accum):
                batch, where = next(batches)
                tracker.update(where)
                first_epoch = where["position"][0] if first_epoch is None else first_epoch
                passed = where["position"][0] > first_epoch   # this rank has dealt its whole share once
                n = int(batch["mask"].sum())   # still on the host
                step_tokens += n
                batch = {key: v.to(d.device, non_blocking=True) for key, v in batch.items()}
                with contextlib.ExitStack() as no_sync:
                    if micro < cfg.grad_accum - 1 and d.world > 1 and not cfg.fsdp:
                        for name in trained:   # DDP all-reduces on the last micro-batch only
                            no_sync.enter_context(wrapped[name].no_sync())
                    with autocast(d, cfg.dtype):
                        # Summed per counted position here, divided by the step's total below.
                        metrics = run.loss(wrapped, batch, alpha, lambda objective: (objective * n).backward())
                for key, v in metrics.items():
                    sums[key] = sums.get(key, 0) + v.detach() * n
            tokens += step_tokens
            # The step's one all-reduce: its tokens on all ranks, and how many ranks a preemption signal reached
            # (any of them stops every rank after this same step; a second collective per step made FSDP's
            # teardown abort now and then).
            asked = float(preempt.signal is not None)
            total, asked, passed_all = all_reduce_sum([step_tokens, asked, float(passed)], d.device) \
                if d.world > 1 else (step_tokens, asked, float(passed))
            stop = asked > 0
            counted += total
            if counted == 0 and passed_all >= d.world:   # every rank, identically: no hang
                raise OptionError("the training labels count no position in a whole pass over them"
                                  + (" (--assistant-only: their conversations mark no assistant token)"
                                     if getattr(cfg, "assistant_only", False) else "")
                                  + "; nothing would be learnt")
            to_token_mean([wrapped[name] for name in trained], total, d)
            for name in trained:
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(wrapped[name].parameters(), cfg.grad_clip)
                opts[name].step()
                scheds[name].step()
            step += 1

            last = step == cfg.max_steps
            evaluating = run.eval_stream is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or last)
            if step % cfg.log_every == 0 or evaluating or last:
                record = {"step": step, **{k: float(v) / max(step_tokens, 1) for k, v in sums.items()},
                          "tokens": int(total), "ce_weight": alpha,
                          **{("lr" if name == "student" else f"{name}_lr"): scheds[name].get_last_lr()[0]
                             for name in trained},
                          "tokens_per_s": tokens * d.world / max(time.time() - t0, 1e-9)}
                if evaluating:
                    record.update(held_out())
                if last and dist.is_initialized():
                    record["weight_digests"] = [x for m in run.models.values() for x in gather_weight_digests(m)]
                log.write(record)
                if bar is not None:
                    bar.set_postfix_str(f"loss {record['loss']:.3f}", refresh=False)
            if bar is not None:
                bar.update(1)
            if (cfg.save_every and step % cfg.save_every == 0) or last or stop:
                full = {name: full_states(wrapped[name], opts[name]) for name in trained} if fsdp else None
                loader_state = gather_loader_state(tracker)
                if d.main:
                    saved = save_checkpoint(out, step, run.models, opts, scheds, run.tokenizer, loader_state, run.meta, full)
                    checkpoint.push(rd, saved, (METRICS_FILE,))
                if dist.is_initialized():
                    dist.barrier()
            if stop:
                break
    if bar is not None:
        bar.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    stopped = (preempt.signal or "another rank's signal") if stop and step < cfg.max_steps else None
    return {"step": step, "out": str(rd), "stopped_by": stopped, "world": d.world}
