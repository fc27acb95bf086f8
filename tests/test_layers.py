"""The pure-math layers import no distribution or device stack (DESIGN.md "Layout").

Each module is imported in a fresh interpreter, then ``sys.modules`` is checked: importing
``rlhf.algo``, ``rlhf.metrics`` or bai's merge methods must not pull in Ray, DeepSpeed, vLLM or
Megatron, directly or through a dependency.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

FORBIDDEN = ("ray", "deepspeed", "vllm", "megatron")
PURE_MODULES = ["rlhf.algo", "rlhf.metrics"]
# bai's merge-method module; the name the merge engine settles on is whichever of these exists
BAI_METHOD_CANDIDATES = ["bai.methods", "bai.merge.methods", "bai.merge_methods"]


def _bai_methods() -> list[str]:
    found = []
    for name in BAI_METHOD_CANDIDATES:
        try:
            if importlib.util.find_spec(name) is not None:
                found.append(name)
        except ModuleNotFoundError:
            continue
    return found


def _loaded_forbidden(module: str) -> list[str]:
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(json.dumps(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", PURE_MODULES + _bai_methods())
def test_pure_layer_imports_no_distribution_stack(module):
    bad = _loaded_forbidden(module)
    assert not bad, f"importing {module} loaded {bad[:10]}"


def test_the_check_would_catch_a_violation():
    # the harness itself must see a forbidden import when there is one
    assert "ray" in [m.split(".")[0] for m in _loaded_forbidden("ray")]
