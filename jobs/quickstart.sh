#!/usr/bin/env bash
# The whole pipeline on one CPU machine, no downloads (`make demo` runs it):
# a small teacher trained on Python's stdlib source labels part of that source
# with its top-k distribution, the labels are validated and inspected, then a
# student is trained on them.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
BIN=${BIN:-.venv/bin}
DEMO=${DEMO:-demo}
STDLIB=$("$BIN/python" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')

[ -f "$DEMO/teacher/config.json" ] || "$BIN/labelgen" demo-teacher "$DEMO/teacher"
mkdir -p "$DEMO/corpus"
CORPUS=$(cd "$DEMO/corpus" && pwd)
(cd "$STDLIB" && find json email -name '*.py' -size +100c -exec cp --parents {} "$CORPUS" \;)
"$BIN/labelgen" generate --teacher "$DEMO/teacher" --input "$DEMO/corpus" \
    --out "$DEMO/labels" --mode topk --k 64 --max-seq-len 256 --batch-tokens 4096 --rows-per-shard 16 --overwrite
"$BIN/labelgen" validate "$DEMO/labels"
"$BIN/labelgen" inspect "$DEMO/labels"
"$BIN/student-train" train --labels "$DEMO/labels" --eval-holdout 1 --student-config jobs/student_tiny.json \
    --out "$DEMO/student" --max-steps 100 --loss kd --lr 3e-3 --batch-size 8 --eval-every 25 --save-every 50 --overwrite
echo "student metrics (held-out CE, KL to the teacher, top-1 agreement):"
grep eval_ce "$DEMO/student/metrics.jsonl"
