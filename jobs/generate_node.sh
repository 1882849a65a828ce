#!/usr/bin/env bash
# Label a corpus on one node: one labelgen worker per GPU, then merge the
# workers' manifests. Rerunning the script resumes where it stopped.
#
#   bash jobs/generate_node.sh TEACHER_DIR INPUT_DIR OUT_DIR [extra labelgen flags]
set -euo pipefail
TEACHER=$1 INPUT=$2 OUT=$3
shift 3
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
pids=()
for i in $(seq 0 $((GPUS - 1))); do
    CUDA_VISIBLE_DEVICES=$i labelgen generate --teacher "$TEACHER" --input "$INPUT" --out "$OUT" \
        --num-workers "$GPUS" --worker-index "$i" --resume --no-progress "$@" > "$OUT.worker$i.log" 2>&1 &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
[ "$status" -eq 0 ] || { echo "a worker failed; see $OUT.worker*.log, then rerun this script" >&2; exit 1; }
labelgen finalize "$OUT"
labelgen validate "$OUT"
