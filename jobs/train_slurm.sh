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
preempted=0
trap 'preempted=1; scancel --signal=TERM "$SLURM_JOB_ID"' USR1 TERM
srun torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "${GPUS_PER_NODE:-8}" \
    --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$HEAD:29500" \
    -m student_train.cli train "$@" --resume &
pid=$!
rc=0
while kill -0 "$pid" 2>/dev/null; do
    wait "$pid"
    rc=$?
done
if [ "$preempted" -eq 1 ]; then
    echo "stopped for preemption (srun exit $rc): requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
