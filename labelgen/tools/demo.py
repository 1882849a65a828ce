"""A small teacher built locally, with no download: `labelgen demo-teacher OUT`.

It trains a byte-level BPE tokenizer and a Llama-style model on a corpus
present on every machine (by default the Python standard library's own
source) for a few hundred steps, so the quickstart runs the real pipeline on
a teacher with a real, peaked next-token distribution. Head dimension is 64
(vLLM's CPU attention needs >= 64). Tests build smaller teachers the same way.
"""

from __future__ import annotations

import math
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from labelgen.backends import MODEL_DIR, save_model
from labelgen.errors import OptionError
from labelgen.run.rundir import RunDir

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class DemoTeacherConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    """hidden_size / heads is the head dimension; keep it >= 64 for vLLM."""
    seq_len: int = 128
    batch_size: int = 8
    steps: int = 200
    lr: float = 3e-3
    seed: int = 0
    corpus_bytes: int = 4 << 20
    """Read at most this much text from the corpus."""
    max_positions: int = 1024

    def __post_init__(self):
        if self.hidden_size % self.heads:
            raise OptionError(f"hidden_size {self.hidden_size} is not a multiple of heads {self.heads}")
        if self.steps < 0 or self.vocab_size < 300:
            raise OptionError("steps must be >= 0 and vocab_size >= 300 (byte-level BPE needs 256 base tokens)")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def read_corpus(paths: list[str] | None, max_bytes: int, suffixes=(".py",)) -> list[str]:
    """Texts of the files under `paths` (default: the standard library's .py
    files), in sorted order, up to max_bytes; unreadable files are skipped."""
    from labelgen.generate.inputs import expand_paths
    files = expand_paths([str(stdlib_dir())]) if not paths else expand_paths(paths)
    if not paths:
        files = [f for f in files if f.suffix in suffixes and "test" not in f.parts and "site-packages" not in f.parts]
    texts, total = [], 0
    for f in files:
        try:
            t = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if t.strip():
            texts.append(t)
            total += len(t)
        if total >= max_bytes:
            break
    if not texts:
        raise OptionError(f"--corpus: no readable UTF-8 text under {paths}")
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast
    bpe = ByteLevelBPETokenizer()
    specials = ["<s>", "</s>", "<pad>"]
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=specials, show_progress=False)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(cfg: DemoTeacherConfig, vocab_size: int, seed: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(cfg.seed if seed is None else seed)
    mcfg = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=int(cfg.hidden_size * 8 / 3) // 32 * 32,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                       max_position_embeddings=cfg.max_positions, tie_word_embeddings=False,
                       bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(mcfg)


def token_stream(texts: list[str], tokenizer) -> np.ndarray:
    eos = tokenizer.eos_token_id
    ids = []
    for t in texts:
        ids.extend(tokenizer(t)["input_ids"])
        ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


def build_demo_teacher(out: Path | str, corpus: list[str] | None = None, cfg: DemoTeacherConfig = DemoTeacherConfig(),
                       log=print, overwrite: bool = False) -> Path:
    """Train tokenizer + model, save both in HF format under `out` (a run
    directory: a non-empty one is refused unless `overwrite` and it holds a
    model labelgen wrote)."""
    with RunDir(out, MODEL_DIR) as rd:
        rd.claim(resume=False, overwrite=overwrite)
        return _build(rd, corpus, cfg, log)


def _build(rd: RunDir, corpus: list[str] | None, cfg: DemoTeacherConfig, log) -> Path:
    texts = read_corpus(corpus, cfg.corpus_bytes)
    tok = train_tokenizer(texts, cfg.vocab_size)
    stream = token_stream(texts, tok)
    model = build_model(cfg, len(tok))
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / max(cfg.steps, 1))))
    model.train()
    t0 = time.time()
    for step in range(cfg.steps):
        starts = torch.randint(0, len(stream) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        batch = torch.stack([torch.from_numpy(stream[s:s + cfg.seq_len + 1]) for s in starts.tolist()])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if log and (step % 50 == 0 or step == cfg.steps - 1):
            log(f"demo teacher step {step + 1}/{cfg.steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    return save_model(rd, model, tok)
