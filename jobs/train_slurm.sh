#!/usr/bin/env bash
# Train a student across nodes: one torchrun per node, rendezvous on the first.
# --resume makes a requeued job continue from its latest checkpoint.
#
#   sbatch --nodes=4 jobs/train_slurm.sh CONFIG.yaml [flags]
#   sbatch --gpus-per-node=0 --cpus-per-task=2 --export=ALL,GPUS_PER_NODE=2 jobs/train_slurm.sh ...   # CPU: 2 gloo ranks
#
# Processes per node: GPUS_PER_NODE, else the GPUs Slurm gave the node. The #SBATCH lines are defaults that
# sbatch's own flags override. The log is student-train-<job id>.out in the directory it was submitted from.
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
#SBATCH --output=student-train-%j.out
#SBATCH --open-mode=append
set -uo pipefail
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# torchrun passes SIGTERM on to its workers (a worker's exit code does not reach srun's, so the warning decides).
forward_signal() { scancel --signal=TERM "$SLURM_JOB_ID"; }
srun torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}" \
    --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$HEAD:${MASTER_PORT:-29500}" \
    -m student_train.cli train "$@" --resume &
# sbatch runs a copy of this script from its spool: requeue.sh is beside the script that was submitted.
here=$(dirname "$(scontrol show job "${SLURM_JOB_ID:-}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n 1)")
[ -f "$here/requeue.sh" ] || here=$(dirname "$0")   # run by hand, outside Slurm: beside this script
source "$here/requeue.sh"
