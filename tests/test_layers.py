"""The pure-math layers import no distribution or device stack (DESIGN.md "Layout").

One fresh interpreter imports the pure modules one after another and records, after each
import, which Ray / DeepSpeed / vLLM / Megatron modules are in ``sys.modules``. The pure modules
come first, so anything forbidden that appears is attributed to the import that pulled it in
(directly or through a dependency). ``ray`` itself is imported last as a control: the check
must see it.
"""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("ray", "deepspeed", "vllm", "megatron")
PURE_MODULES = ["rlhf.algo", "rlhf.metrics", "bai.methods"]   # bai.methods: the merge methods


def _forbidden_after_each(modules: list[str]) -> dict[str, list[str]]:
    code = (
        "import importlib, json, sys\n"
        "out = {}\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"    out[name] = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_pure_layers_import_no_distribution_stack():
    loaded = _forbidden_after_each(PURE_MODULES + ["ray"])
    for name in PURE_MODULES:
        assert not loaded[name], f"importing {name} loaded {loaded[name][:10]}"
    assert "ray" in loaded["ray"]          # the control: the check does see a forbidden import
