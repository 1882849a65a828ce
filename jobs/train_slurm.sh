#!/usr/bin/env bash
# Train a student across nodes: one torchrun per node, rendezvous on the first.
# --resume makes a requeued job continue from its latest checkpoint.
#
#   sbatch --nodes=4 jobs/train_slurm.sh CONFIG.yaml [flags]
#
#SBATCH --job-name=student-train
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=logs/student-train-%j.out
set -euo pipefail
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "${GPUS_PER_NODE:-8}" \
    --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$HEAD:29500" \
    -m student_train.cli train "$@" --resume
