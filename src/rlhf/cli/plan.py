"""`rlhf plan`: memory and step-time plan of a train config (model in ``rlhf.plan``)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import rlhf.plan as _lib
from rlhf.plan import load_plan_input, plan, render


def main(argv: list[str] | None = None) -> int:
    """`rlhf plan CONFIG.yaml [key.sub=value ...] [--json]`; exit 0 when it fits, 1 when it does not,
    2 on a bad config (a ``UserError``, printed by the CLI boundary)."""
    ap = argparse.ArgumentParser(prog="rlhf plan", description=_lib.__doc__.split("\n")[0])
    ap.add_argument("config", help="a rlhf train config (configs/ppo/) or a plan YAML (configs/plan/)")
    ap.add_argument("overrides", nargs="*", help="dotted key.sub=value overrides, as for rlhf train")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ns = ap.parse_args(argv)
    inp = load_plan_input(ns.config, ns.overrides)
    res = plan(inp)
    if ns.json:
        out = asdict(res)
        out["per_gpu"] = {k: [{**asdict(m), "total": m.total} for m in v] for k, v in res.per_gpu.items()}
        print(json.dumps(out, indent=2, default=str))
    else:
        print(render(inp, res))
    return 0 if res.fits else 1
