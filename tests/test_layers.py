"""Import layering (DESIGN.md "Layout", issue 13 point 7).

1. The pure-math layers import no distribution or device stack. One fresh interpreter imports the
   pure modules one after another and records, after each import, which Ray / DeepSpeed / vLLM /
   Megatron modules are in ``sys.modules``. The pure modules come first, so anything forbidden
   that appears is attributed to the import that pulled it in (directly or through a
   dependency). ``ray`` itself is imported last as a control: the check must see it.
2. Package direction: ``bairlhf`` (the foundation) imports neither ``bai`` nor ``rlhf``; no
   ``bai`` module imports ``rlhf`` (``bai`` is usable without it). The calibration module, SFT
   then merge, lives in ``rlhf.calibrate`` (the ``bai calibrate`` command dispatches to it by
   name); it imports ``rlhf.sft`` and is the control of this check.
"""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("ray", "deepspeed", "vllm", "megatron")
PURE_MODULES = ["rlhf.algo", "rlhf.metrics", "bai.methods"]   # bai.methods: the merge methods




def _forbidden_after_each(modules: list[str], forbidden=FORBIDDEN) -> dict[str, list[str]]:
    code = (
        "import importlib, json, pkgutil, sys\n"
        "out = {}\n"
        f"for name in {modules!r}:\n"
        "    if name.endswith('.*'):\n"
        "        pkg = importlib.import_module(name[:-2])\n"
        "        for info in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + '.'):\n"
        "            importlib.import_module(info.name)\n"
        "    else:\n"
        "        importlib.import_module(name)\n"
        f"    out[name] = sorted(m for m in sys.modules if m.split('.')[0] in {tuple(forbidden)!r})\n"
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


def test_bairlhf_imports_neither_bai_nor_rlhf():
    loaded = _forbidden_after_each(["bairlhf.*"], forbidden=("bai", "rlhf"))
    assert not loaded["bairlhf.*"], f"importing bairlhf loaded {loaded['bairlhf.*'][:10]}"


def test_bai_imports_no_rlhf():
    loaded = _forbidden_after_each(["bai.*", "rlhf.calibrate"], forbidden=("rlhf",))
    assert not loaded["bai.*"], f"importing bai loaded {loaded['bai.*'][:10]}"
    assert "rlhf.sft" in loaded["rlhf.calibrate"]      # the control: the application layer does import rlhf
