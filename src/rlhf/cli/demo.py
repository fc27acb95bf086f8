"""`rlhf demo`: the README's end-to-end CPU demo (pipeline in ``rlhf.demo``)."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

from bairlhf.outputs import atomic_write, mark_output, owner
import rlhf.demo as _lib
from rlhf.demo import ALPHAS, COMMAND, DemoError, PPO_CONFIG, build_organism, check_out, organism_figure, run_ppo, sweep_eval, verdict_line


def check_args(args) -> None:
    """The flag values (``DemoError`` names the flag)."""
    if not (math.isfinite(args.alpha) and 0.0 <= args.alpha <= 1.0):
        raise DemoError(f"--alpha: must lie in [0, 1], got {args.alpha}")
    if args.steps < 1:
        raise DemoError(f"--steps: must be at least 1, got {args.steps}")
    if args.seed < 0:
        raise DemoError(f"--seed: must be >= 0, got {args.seed}")
    if not PPO_CONFIG.exists():
        raise DemoError(f"{PPO_CONFIG} not found (run the demo from a source checkout)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rlhf demo", description=_lib.__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo", help="demo directory (default: ./runs/demo); reused when an "
                    "earlier demo wrote it")
    ap.add_argument("--steps", type=int, default=60, help="PPO steps per run, >= 1 (default: 60)")
    ap.add_argument("--alpha", type=float, default=0.3, help="BAI base weight of the second PPO run, in [0, 1] "
                    "(default: 0.3)")
    ap.add_argument("--seed", type=int, default=0, help="PPO seed, >= 0 (the organism is built with seed 0)")
    args = ap.parse_args(argv)
    check_args(args)
    root = Path(args.out).resolve()
    check_out(root, args.alpha)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import torch

    torch.set_num_threads(1)

    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    mark_output(root, COMMAND)
    cached = (root / "testbed" / "build_report.json").exists()
    tb, build_report = build_organism(root)
    ev = build_report["eval"]
    print(f"[demo] organism {'reused' if cached else 'built'} in {root / 'testbed'} "
          f"({time.perf_counter() - t0:.0f}s): " + ", ".join(
              f"{n} acc {m['gold/accuracy']:.2f} think {m['rollout/think_rate']:.2f}" for n, m in ev.items()))
    rmp = build_report["rm"]
    print(f"[demo] reward model (short answers only): held-out pair accuracy {rmp['eval_pair_accuracy']:.2f}; "
          f"correct long answers score {rmp['long_minus_short_std']:+.2f} std vs correct short ones")

    import bai

    models = tb / "models"
    recipe = {"method": "bai", "base": str(models / "base"), "alphas": ALPHAS,
              "sft_models": [{"path": str(models / "instruct"), "weight": 0.5},
                             {"path": str(models / "reasoning"), "weight": 0.5}]}
    t = time.perf_counter()
    if owner(root / "bai_sweep") is None and (root / "bai_sweep" / "eval.json").is_file():
        (root / "bai_sweep" / "eval.json").unlink()  # an older demo's: bai merge then sees its own legacy sweep
    dirs = bai.merge(recipe, root / "bai_sweep", force=True, progress=False)
    sweep = sweep_eval(tb, dirs)
    print(f"[demo] BAI two-stage merge (instruct+reasoning 50/50, then base at alpha) in one pass: "
          f"{len(dirs)} checkpoints in {root / 'bai_sweep'} ({time.perf_counter() - t:.0f}s with evaluation)")
    for a, m in zip(ALPHAS, sweep):
        print(f"[demo]   alpha {a:.1f}: acc {m['gold/accuracy']:.2f}  think {m['rollout/think_rate']:.2f}  "
              f"length {m['length_chars']:.0f} chars")
    atomic_write(root / "bai_sweep" / "eval.json", json.dumps(dict(zip(map(str, ALPHAS), sweep)), indent=2) + "\n")

    runs = run_ppo(root, tb, recipe, args.steps, args.alpha, args.seed)

    from rlhf.report import load_run, write_report

    report = root / "report"
    if report.is_dir() and owner(report) is None:  # an unmarked report of an older demo (check_out)
        shutil.rmtree(report)
    report = write_report(runs, report, force=True)
    loaded = [load_run(r) for r in runs]
    organism_figure(loaded, report / "organism.png")
    for run in loaded:
        print("[demo] " + verdict_line(run))
    print("[demo] figures: " + ", ".join(str(report / f) for f in
                                          ("organism.png", "length.png", "reward.png", "reward_buckets.png", "kl.png")))
    print(f"[demo] summary: {report / 'summary.md'}")
    print(f"[demo] TensorBoard: tensorboard --logdir {root / 'ppo'}")
    print("[demo] the full organism: `rlhf testbed build`, `rlhf train configs/testbed/rm_mix.yaml` (docs/testbed.md)")
    print(f"[demo] done in {time.perf_counter() - t0:.1f}s: wrote {root}/ (testbed/ organism, models/ links, "
          f"bai_sweep/ {len(dirs)} merges, ppo/ {len(runs)} runs, report/)")
    return 0
