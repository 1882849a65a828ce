#!/usr/bin/env bash
# Train a student on one node with DDP (add --fsdp to the config or flags for
# a student that does not fit one GPU).
#
#   bash jobs/train_torchrun.sh CONFIG.yaml [flags overriding the config]
set -euo pipefail
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$GPUS" -gt 0 ] || GPUS=2   # CPU: two gloo processes
exec torchrun --standalone --nproc-per-node "$GPUS" -m student_train.cli train "$@"
