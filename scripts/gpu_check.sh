#!/usr/bin/env bash
# Check a GPU machine end to end in one command (issue 14.5): install the CUDA builds of torch and
# vLLM into .venv, then DeepSpeed, vLLM (reload + broadcast weight sync), megatron-core and
# `rlhf train` on the real model in bf16, under a 10-minute budget; prints one table and writes
# runs/gpu_check/results.{json,md}. All logic is in scripts/gpu_check.py (see docs/gpu_check.md).
# Exit: 0 pass, 1 a step failed, 2 bad usage, 3 no CUDA device. Arguments pass through, e.g.
#   bash scripts/gpu_check.sh --dry-run
#   bash scripts/gpu_check.sh --force --budget 900 --peak-tflops 989
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=${PYTHON:-python3}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py "$@"
