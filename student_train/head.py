"""The student's LM head and its losses, a chunk of positions at a time.

A causal LM's logits are [batch, positions, vocabulary]: at V = 151,936 and
2 x 4,096 positions, 5 GB in fp32, as much again for their gradient, and
more for the losses' fp32 work. Here they never exist whole. The model runs
as usual up to its final hidden states h [N, d]; then, for `chunk`
positions at a time, the logits z = h W^T (+ b) are made in fp32, `terms(z,
rows)` computes the loss and every metric on them (objective.py: per-chunk
sums, one of them the differentiable "objective"), and the gradient of the
objective with respect to h and W is taken on the spot, as Liger's fused
linear cross-entropy does: backward only scales what the forward pass left.
Peak memory holds one chunk's logits (and the losses' work on them) and W's
gradient, whatever the batch; the full-vocabulary normaliser of each
position comes out of the same pass.

The head runs where the model's own would: its forward is swapped for this
one while the model runs, so DDP, FSDP (which gathers a sharded head weight
around the model's forward) and transformers.Trainer see an ordinary
forward. A model whose forward changes the head's output (Gemma 2's logit
soft-capping) is found out before its first chunked step (`chunkable`) and
keeps the dense path: the model's own logits, every position at once
(chunk 0 asks for that path too).

Run by objective.py (student-train train, rounds, DistillTrainer), train.py's
held-out score and codistill.py.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Callable

import torch

# terms(z [c, V] fp32 logits, rows {name: [c, ...]}) -> {name: additive total over chunks}
Terms = Callable[[torch.Tensor, dict], dict]
# The batch's model inputs (and HF's labels, from hf.LabelCollator); every other entry is per position [B, T-1, ...].
INPUTS = ("input_ids", "attention_mask", "labels")
_chunkable: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def unwrapped(model):
    """The causal LM inside DDP / accelerate (.module) or torch.compile (._orig_mod) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model


class _ChunkedHead(torch.autograd.Function):
    """hidden [N, d], weight [V, d], bias [V] | None -> the objective's total;
    the other totals land in `totals`. The gradients are taken in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, terms: Terms, rows: dict, chunk: int, grads: bool, totals: dict):
        device = hidden.device.type
        # The matmuls in the autocast dtype where autocast is on (as the model's own head would run), the
        # logits and their gradient in fp32, W's gradient accumulated in fp32.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        n = hidden.shape[0]
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.float()
            dh = torch.empty_like(hidden) if grads else None
            dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
            db = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if grads and b is not None else None
            for start in range(0, max(n, 1), chunk):
                h = hidden[start:start + chunk].to(dtype)
                z = (h @ w.T).float()
                z = z if b is None else z + b
                with torch.enable_grad():
                    z.requires_grad_(grads)
                    out = terms(z, {name: v[start:start + chunk] for name, v in rows.items()})
                    objective = out["objective"]
                    g = torch.autograd.grad(objective, z)[0] if grads and objective.requires_grad else None
                for name, v in out.items():
                    totals[name] = totals[name] + v.detach() if name in totals else v.detach()
                if not grads:
                    continue
                g = torch.zeros_like(z) if g is None else g
                gd = g.to(dtype)
                dh[start:start + chunk] = gd @ w
                if dtype == torch.float32:
                    dw.addmm_(gd.T, h)
                else:
                    dw += gd.T @ h
                if db is not None:
                    db += g.sum(0)
        ctx.save_for_backward(dh, dw, db)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return totals["objective"].clone()

    @staticmethod
    def backward(ctx, grad):
        dh, dw, db = ctx.saved_tensors   # taken in forward (a Function run without gradients has no backward)
        return (dh * grad.to(dh.dtype), (dw * grad).to(ctx.weight_dtype),
                None if db is None else (db * grad).to(ctx.bias_dtype), None, None, None, None, None)


@contextlib.contextmanager
def _head_forward(head, forward):
    """`head`'s forward replaced by `forward` while the model runs (its hooks, FSDP's among them, still run)."""
    before = head.__dict__.get("forward")
    head.forward = forward
    try:
        yield
    finally:
        if before is None:
            del head.forward
        else:
            head.forward = before


def chunkable(model) -> bool:
    """Whether the model's output is its output embedding's output, untouched
    (checked once per model, on two tokens): no soft-capping or scaling after
    the head, which the chunked path would skip."""
    lm = unwrapped(model)
    if lm not in _chunkable:
        head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
        sentinel = torch.zeros(1)
        ok = isinstance(head, torch.nn.Linear)
        if ok:
            with _head_forward(head, lambda hidden: sentinel), torch.no_grad():
                ids = torch.zeros((1, 2), dtype=torch.long, device=head.weight.device)
                ok = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits is sentinel
        if not ok:
            why = "its forward changes its LM head's output (logit soft-capping or scaling?)" if \
                isinstance(head, torch.nn.Linear) else "its output embedding is not a torch.nn.Linear"
            warnings.warn(f"{type(lm).__name__}: {why}, so its full [batch, positions, vocabulary] logits are "
                          "computed: memory grows with the vocabulary", stacklevel=2)
        _chunkable[lm] = ok
    return _chunkable[lm]


# MiB of fp32 logits per chunk when the config leaves it open. CPU: measured (benchmarks/bench_head.py, 2 cores,
# V = 49,152, 2 x 4,096 positions: 32 MiB 3.7 s a step, 8 MiB 4.8 s, 64 MiB 6.3 s: larger chunks pay page faults
# for each fresh allocation). GPU: not measured yet; Liger's fused linear cross-entropy sizes its chunks alike
# (chunk logits about as large as the chunk's hidden states x V / d: a few hundred MiB), and a few hundred
# positions a chunk keep the head's matmul wide enough for the tensor cores.
CHUNK_MB = {"cpu": 32, "cuda": 256}


def full_logits(model, batch: dict, width: int | None = None) -> torch.Tensor:
    """[B, T-1, width] the model's own logits that predict each next token,
    every position at once (for analyses that need them all; training does not)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :width]


def positions(chunk_mb: float | None, width: int, device: torch.device) -> int:
    """Positions per chunk: chunk_mb MiB of fp32 logits `width` wide (None: CHUNK_MB for the device)."""
    mb = CHUNK_MB.get(device.type, CHUNK_MB["cuda"]) if chunk_mb is None else chunk_mb
    return max(1, int(mb * 2**20) // (4 * width))


def run(model, batch: dict, terms: Terms, chunk_mb: float | None, width: int | None = None, keep: bool = False) -> dict:
    """`terms` over the next-token logits of every position of `batch`
    (input_ids [B, T] and per-position rows [B, T-1, ...]): the totals, their
    "objective" differentiable when gradients are on. `chunk_mb`: MiB of
    fp32 logits per chunk (None: CHUNK_MB), 0 for the model's own full logits; `width`: only the first
    `width` logits count (a padded vocabulary cut to its tokenizer's).
    keep=True adds what a second model needs to make these logits again
    (codistill's teacher), detached: "hidden" [B, T-1, d] and the head's
    "weight" and "bias"; or "logits" [B, T-1, V] on the dense path."""
    rows = {name: v for name, v in batch.items() if name not in INPUTS}
    if chunk_mb == 0 or not chunkable(model):
        logits = full_logits(model, batch, width)
        totals = terms(logits, rows)
        return {**totals, "logits": logits.detach()} if keep else totals
    head = unwrapped(model).get_output_embeddings()
    totals: dict = {}

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        h = hidden[:, :-1].flatten(0, 1)
        weight, bias = head.weight[:width], None if head.bias is None else head.bias[:width]
        if keep:   # FSDP frees a gathered weight after the model's forward: keep a copy of it
            from torch.distributed.fsdp import FSDPModule
            sharded = isinstance(model, FSDPModule)
            totals.update(hidden=hidden[:, :-1].detach(), weight=weight.detach().clone() if sharded else weight.detach(),
                          bias=None if bias is None else bias.detach())
        grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
        flat = {name: v.flatten(0, 1) for name, v in rows.items()}
        return _ChunkedHead.apply(h, weight, bias, terms, flat, positions(chunk_mb, weight.shape[0], h.device),
                                  grads, totals)

    with _head_forward(head, forward):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    totals["objective"] = out.logits
    return totals


def logits_of(rows: dict, prefix: str, kept: dict) -> torch.Tensor:
    """A chunk's logits of the model `kept` came from (run(..., keep=True)),
    its kept rows passed on under `prefix`: made again from its hidden
    states and head, or, from the dense path, as they were."""
    if prefix + "logits" in rows:
        return rows[prefix + "logits"]
    z = (rows[prefix + "hidden"].to(kept["weight"].dtype) @ kept["weight"].T).float()
    return z if kept["bias"] is None else z + kept["bias"].float()
