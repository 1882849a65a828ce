#!/usr/bin/env bash
# Train a student across nodes: one torchrun per node, rendezvous on the first.
# --resume makes a requeued job continue from its latest checkpoint.
#
#   sbatch --nodes=4 jobs/train_slurm.sh CONFIG.yaml [flags]
#
# Three minutes before the time limit (and on preemption) Slurm sends SIGUSR1
# to this script, which sends SIGTERM to the job's processes: torchrun passes it
# to its workers, which finish the step in progress, save a checkpoint and exit
# 75; the job then requeues itself and resumes from that checkpoint.
#SBATCH --job-name=student-train
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
#SBATCH --output=logs/student-train-%j.out
set -uo pipefail
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# torchrun passes SIGTERM on to its workers (a worker's exit code does not reach srun's, so the warning decides).
forward_signal() { scancel --signal=TERM "$SLURM_JOB_ID"; }
srun torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "${GPUS_PER_NODE:-8}" \
    --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$HEAD:29500" \
    -m student_train.cli train "$@" --resume &
JOBS=$(dirname "$0")   # sbatch runs a copy of this script: then jobs/ under the directory it was submitted from
[ -f "$JOBS/requeue.sh" ] || JOBS=${SLURM_SUBMIT_DIR:-.}/jobs
source "$JOBS/requeue.sh"
