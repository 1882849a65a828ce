#!/usr/bin/env bash
# The evidence report (docs/results.md + plots): storage, teacher throughput
# and student quality of every distillation method, measured in one run.
#   bash jobs/report.sh [--quick] [--corpus DIR ...] [--out docs]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${BIN:-.venv/bin}/python" benchmarks/report.py "$@"
