"""Checkpoints: `OUT/step_NNNNNN/` holds the model and tokenizer in HF format
(safetensors), optimizer and scheduler state, RNG state, loader positions and
meta.json (config, step, data fingerprints). Written to a temporary directory
and renamed, so a checkpoint directory that exists is complete. Nothing is
unpickled on load: torch.load(weights_only=True) and JSON only."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from labelgen.errors import FormatError, one_line
from labelgen.run.rundir import RunDir
from labelgen.store import fsutil, storage

CHECKPOINTS = "step_*"                        # a training run's checkpoints: OUT/step_NNNNNN/
CHECKPOINT_RE = re.compile(r"^step_(\d{6,})$")
META = "meta.json"                            # written last: a checkpoint counts once it is there


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / f"step_{step:06d}"


def complete(ckpt) -> bool:
    """The checkpoint directory (local or in a bucket) is whole: its meta.json, written last, is there."""
    return (ckpt / META).is_file()


def steps(out) -> list[tuple[int, Path]]:
    """(step, directory) of the checkpoint directories in `out`, whole or not, by step."""
    return sorted((int(m.group(1)), p) for p in storage.list_dir(out, CHECKPOINTS) if (m := CHECKPOINT_RE.match(p.name)))


def latest_checkpoint(out: Path) -> Path | None:
    whole = [p for _, p in steps(out) if complete(p)]
    return whole[-1] if whole else None


def pull(rd: RunDir, resume: bool, files: tuple[str, ...]) -> None:
    """Where a training run starts: a bucket run's staging directory starts
    empty, and a resumed one (on any machine) from the bucket's last whole
    checkpoint and `files`."""
    if not rd.main:
        return
    storage.make_dir(rd.local)
    if rd.remote:
        rd.empty_staging()
    if not (rd.remote and resume):
        return
    found = []
    for obj in storage.list_tree(rd.remote):   # one listing, not a request per checkpoint
        parts = obj.key[len(rd.remote.key):].strip("/").split("/")
        if len(parts) == 2 and parts[1] == META and (m := CHECKPOINT_RE.match(parts[0])):
            found.append(int(m.group(1)))
    if found:
        name = checkpoint_dir(Path(), max(found)).name
        storage.download_tree(rd.remote / name, rd.local / name)
        for f in files:
            if (rd.remote / f).is_file():
                storage.download_file(rd.remote / f, rd.local / f)


def push(rd: RunDir, ckpt: Path, files: tuple[str, ...], keep: int = 1) -> None:
    """A saved checkpoint to the bucket (meta.json last: until it is there the
    checkpoint does not count), then `files`; the staging directory then keeps
    only the newest `keep` checkpoints (a spot node's disk stays small)."""
    if not rd.remote:
        return
    rd.check_held()
    storage.upload_tree(ckpt, rd.remote / ckpt.name, last=META)
    for f in files:
        if (rd.local / f).is_file():
            storage.upload_file(rd.local / f, rd.remote / f)
    for _, old in steps(rd.local)[:-keep]:   # by step, not by name: step_1000000 sorts before step_999999
        storage.remove_tree(old)


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
        storage.write_bytes(tmp / META, json.dumps({**meta, "step": step}, indent=2, default=str).encode())
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
        raise FormatError(f"{path}: missing from the checkpoint") from None
    except Exception:   # UnpicklingError for foreign objects, RuntimeError for a damaged file
        raise FormatError(f"{path}: not a plain tensor file (damaged, or holds objects that would need "
                         "unpickling code, which labelgen refuses)") from None


def _load_json(path: Path):
    try:
        return json.loads(storage.read_text(path, 64 << 20))
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: unreadable checkpoint file ({e})") from None


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
                raise FormatError(f"{f}: unreadable weights ({one_line(e)})") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Tied embeddings are saved once; everything else must be there.
        missing = [m for m in missing if not (getattr(model.config, "tie_word_embeddings", False) and "lm_head" in m)]
        if missing or unexpected:
            raise FormatError(f"{where}: checkpoint does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


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
    return _load_json(path / META), _load_json(path / "loader.json")

