"""Checkpoints: `OUT/step_NNNNNN/` holds the model and tokenizer in HF format
(safetensors), optimizer and scheduler state, RNG state, loader positions and
meta.json (config, step, data fingerprints). Written to a temporary directory
and renamed, so a checkpoint directory that exists is complete. Nothing is
unpickled on load: torch.load(weights_only=True) and JSON only."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from labelgen.run.rundir import CHECKPOINT_RE
from labelgen.store import fsutil, storage


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / f"step_{step:06d}"


def latest_checkpoint(out: Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in storage.list_dir(out, "step_*")
             if (m := CHECKPOINT_RE.match(p.name)) and (p / "meta.json").is_file()]
    return max(found)[1] if found else None


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(out: Path, step: int, models: dict, optimizers: dict, schedulers: dict, tokenizer,
                    loader_state: dict, meta: dict, full_states: dict | None = None) -> Path:
    """`models` etc. map a name ("student", "teacher") to the object; a single
    model is saved at the top level, several in subdirectories. `full_states`
    (name -> (model state, optimizer state)) replaces what the objects hold:
    FSDP gathers full state dicts on every rank before rank 0 saves."""
    from safetensors import SafetensorError
    final = checkpoint_dir(out, step)
    tmp = final.with_name("." + final.name + ".tmp")
    storage.remove_tree(tmp)
    try:
        storage.make_dir(tmp)
        for name, model in models.items():
            where = tmp if len(models) == 1 else tmp / name
            model_state, opt_state = (full_states or {}).get(name, (None, optimizers[name].state_dict()))
            model.save_pretrained(where, safe_serialization=True, state_dict=model_state)
            tokenizer.save_pretrained(where)
            torch.save(opt_state, where / "optimizer.pt")
            storage.write_bytes(where / "scheduler.json", json.dumps(schedulers[name].state_dict(), default=float).encode())
        torch.save(rng_state(), tmp / "rng.pt")
        storage.write_bytes(tmp / "loader.json", json.dumps(loader_state).encode())
        storage.write_bytes(tmp / "meta.json", json.dumps({**meta, "step": step}, indent=2, default=str).encode())
        fsutil.fsync_tree(tmp)   # what the libraries wrote (weights, optimizer state)
    except BaseException as e:
        storage.remove_tree(tmp)   # no half checkpoint: resume takes the last whole one
        # A full disk surfaces as safetensors' error (weights) or torch.save's RuntimeError ("unexpected pos",
        # optimizer state): one line naming the checkpoint, not a traceback.
        if isinstance(e, (SafetensorError, RuntimeError)) and not isinstance(e, NotImplementedError):
            raise OSError(f"{final}: cannot write the checkpoint ({_why_not_written(out, e)})") from None
        raise
    fsutil.replace_dir(tmp, final)
    return final


def _why_not_written(out: Path, e: BaseException) -> str:
    """'no space left on device' when the disk is (nearly) full, else the library's words."""
    free = fsutil.free_bytes(out)
    return "no space left on device" if free is not None and free < 64 << 20 else " ".join(str(e).split())[:300]


def _load_tensors(path: Path):
    """torch.load with weights_only=True, and one clear error for anything else:
    a checkpoint may come from elsewhere, and its pickles are never run."""
    try:
        return torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing from the checkpoint") from None
    except Exception:   # UnpicklingError for foreign objects, RuntimeError for a damaged file
        raise ValueError(f"{path}: not a plain tensor file (damaged, or holds objects that would need "
                         "unpickling code, which labelgen refuses)") from None


def _load_json(path: Path):
    try:
        return json.loads(storage.read_text(path, 64 << 20))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable checkpoint file ({e})") from None


def load_weights(path: Path, models: dict) -> None:
    """Load saved weights into unwrapped models (before DDP/FSDP wraps them)."""
    from safetensors.torch import load_file
    for name, model in models.items():
        where = path if len(models) == 1 else path / name
        state = {}
        for f in storage.list_dir(where, "*.safetensors"):
            try:
                state.update(load_file(f))
            except Exception as e:  # safetensors' own error type: a truncated or damaged file
                raise ValueError(f"{f}: unreadable weights ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Tied embeddings are saved once; everything else must be there.
        missing = [m for m in missing if not (getattr(model.config, "tie_word_embeddings", False) and "lm_head" in m)]
        if missing or unexpected:
            raise ValueError(f"{where}: checkpoint does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_states(path: Path, optimizers: dict, schedulers: dict, fsdp_models: dict | None = None) -> tuple[dict, dict]:
    """Load optimizer, scheduler and RNG state; returns (meta, loader_state).
    The full optimizer state of the models in `fsdp_models` is sharded onto them."""
    for name, opt in optimizers.items():
        where = path if len(optimizers) == 1 else path / name
        state = _load_tensors(where / "optimizer.pt")
        if fsdp_models and name in fsdp_models:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(fsdp_models[name], opt, state, options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(state)
        schedulers[name].load_state_dict(_load_json(where / "scheduler.json"))
    set_rng_state(_load_tensors(path / "rng.pt"))
    return _load_json(path / "meta.json"), _load_json(path / "loader.json")

