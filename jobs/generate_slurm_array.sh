#!/usr/bin/env bash
# Label a corpus with a Slurm job array: one task per GPU, each taking every N-th shard of the input
# (labelgen reads SLURM_ARRAY_TASK_ID/COUNT itself). A requeued or rerun task resumes: finished shards are skipped.
#
#   sbatch --array=0-15 jobs/generate_slurm_array.sh TEACHER_DIR INPUT OUT_DIR [labelgen generate flags]
#   sbatch --dependency=afterok:<array job id> --wrap "labelgen finalize OUT_DIR"   # merges the manifests once all end
#   labelgen finalize OUT_DIR --missing        # the tasks that have not finished, as an --array= list to resubmit
#
# Flags after OUT_DIR go to `labelgen generate` as given (--mode, --k, --backend vllm, ...; its defaults otherwise).
# The #SBATCH lines are defaults: sbatch's own flags override them (a CPU node: --gpus-per-task=0 --cpus-per-task=2).
# Each task logs to labelgen-<array job>_<task>.out in the directory it was submitted from (a requeued attempt appends).
# Two minutes before the time limit (and on preemption) Slurm sends SIGUSR1 to this script, which passes it on;
# labelgen stops, keeps its finished shards and exits 75, and the task requeues itself (only itself).
#SBATCH --job-name=labelgen
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --output=labelgen-%A_%a.out
#SBATCH --open-mode=append
set -uo pipefail
TEACHER=$1 INPUT=$2 OUT=$3
shift 3
labelgen generate --teacher "$TEACHER" --input "$INPUT" --out "$OUT" --resume --no-progress "$@" &
# sbatch runs a copy of this script from its spool: requeue.sh is beside the script that was submitted (an
# array's last task shares its id with the array, which scontrol then shows whole: its first Command line).
here=$(dirname "$(scontrol show job "${SLURM_JOB_ID:-}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n 1)")
[ -f "$here/requeue.sh" ] || here=$(dirname "$0")   # run by hand, outside Slurm: beside this script
source "$here/requeue.sh"
