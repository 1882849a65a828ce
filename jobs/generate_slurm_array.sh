#!/usr/bin/env bash
# Label a corpus with a Slurm job array: one task per GPU, each taking every
# N-th shard of the input (labelgen reads SLURM_ARRAY_TASK_ID/COUNT itself).
# A requeued or rerun task resumes: finished shards are skipped.
#
#   sbatch --array=0-15 jobs/generate_slurm_array.sh TEACHER_DIR INPUT_DIR OUT_DIR [extra labelgen flags]
#   sbatch --dependency=afterok:<array job id> --wrap "labelgen finalize OUT_DIR"
#
#SBATCH --job-name=labelgen
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=logs/labelgen-%A_%a.out
set -euo pipefail
TEACHER=$1 INPUT=$2 OUT=$3
shift 3
exec labelgen generate --teacher "$TEACHER" --input "$INPUT" --out "$OUT" \
    --mode topk --k 64 --backend vllm --resume --no-progress "$@"
