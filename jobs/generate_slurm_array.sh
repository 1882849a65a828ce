#!/usr/bin/env bash
# Label a corpus with a Slurm job array: one task per GPU, each taking every
# N-th shard of the input (labelgen reads SLURM_ARRAY_TASK_ID/COUNT itself).
# A requeued or rerun task resumes: finished shards are skipped.
#
#   sbatch --array=0-15 jobs/generate_slurm_array.sh TEACHER_DIR INPUT_DIR OUT_DIR [extra labelgen flags]
#   labelgen finalize OUT_DIR --missing        # which tasks have not finished (an --array= list to resubmit)
#   sbatch --dependency=afterok:<array job id> --wrap "labelgen finalize OUT_DIR"
#
# Two minutes before the time limit (and on preemption) Slurm sends SIGUSR1;
# labelgen stops, keeps its finished shards and exits 75, and the task requeues itself.
#SBATCH --job-name=labelgen
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --output=logs/labelgen-%A_%a.out
set -uo pipefail
TEACHER=$1 INPUT=$2 OUT=$3
shift 3
labelgen generate --teacher "$TEACHER" --input "$INPUT" --out "$OUT" \
    --mode topk --k 64 --backend vllm --resume --no-progress "$@" &
JOBS=$(dirname "$0")   # sbatch runs a copy of this script: then jobs/ under the directory it was submitted from
[ -f "$JOBS/requeue.sh" ] || JOBS=${SLURM_SUBMIT_DIR:-.}/jobs
source "$JOBS/requeue.sh"
