"""`rlhf sweep`: a BAI ratio sweep (library: ``rlhf.sweep``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import rlhf.sweep as _lib
from rlhf.sweep import DONE, SweepError, ensure_merged, load_sweep, point_overrides, prepare_out, run_point_local, run_sweep


class _ArgParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``SweepError`` line (the CLI boundary prints it)."""

    def error(self, message: str):
        raise SweepError(f"{message} (see rlhf sweep --help)")


def main(argv: list[str] | None = None) -> int:
    """`rlhf sweep SWEEP.yaml [key.sub=value ...] [--point NAME] [--max-runs N] [--dry-run] [--force]`."""
    ap = _ArgParser(prog="rlhf sweep", description=_lib.__doc__.split("\n")[0])
    ap.add_argument("sweep", help="sweep YAML (see configs/sweep/)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value applied to every run (e.g. cluster.address=HEAD:6379)")
    ap.add_argument("--point", help="run only this point (what a Ray job of the sweep runs)")
    ap.add_argument("--max-runs", type=int, help="run at most N unfinished points now (the rest on the next call)")
    ap.add_argument("--dry-run", action="store_true", help="print the points and their overrides; run nothing")
    ap.add_argument("--force", action="store_true",
                    help="start afresh: replace an earlier `rlhf sweep` output at OUT (only one with its marker)")
    ns = ap.parse_args(argv)
    if ns.max_runs is not None and ns.max_runs < 1:
        raise SweepError(f"--max-runs: must be >= 1, got {ns.max_runs}")
    sweep = load_sweep(ns.sweep, ns.overrides)
    if ns.point and not any(p.name == ns.point for p in sweep.points):
        raise SweepError(f"--point: no point named {ns.point!r} (known: {', '.join(p.name for p in sweep.points)})")
    if ns.dry_run:
        resume = prepare_out(sweep, force=ns.force, create=False)
        print(f"sweep: {len(sweep.points)} runs -> {sweep.out}; merge alphas {sweep.merge['alphas']} "
              f"into {sweep.out / 'models'} (one pass); launcher {sweep.launcher}")
        for p in sweep.points:
            state = "done" if resume and (sweep.run_dir(p) / DONE).exists() else "todo"
            print(f"  [{state}] {p.name}: rlhf train {sweep.ppo_config} {' '.join(point_overrides(sweep, p))}")
        print(f"rlhf sweep: dry run, nothing written ({sweep.out} would be "
              f"{'resumed' if resume else 'created'})")
        return 0
    if ns.point:
        prepare_out(sweep, force=False)      # a Ray job of the sweep: OUT is the sweep's own
        ensure_merged(sweep)
        p = next(p for p in sweep.points if p.name == ns.point)
        run_point_local(sweep, p)
        print(f"rlhf sweep: point {p.name} done: {sweep.run_dir(p)}")
        return 0
    ran = run_sweep(sweep, Path(ns.sweep), max_runs=ns.max_runs, force=ns.force)
    done = all((sweep.run_dir(p) / DONE).exists() for p in sweep.points)
    if done:
        print(f"rlhf sweep: ran {len(ran)} run(s); wrote {sweep.out / 'summary.md'} and {sweep.out / 'report'}/ "
              f"(runs in {sweep.out / 'runs'})")
    else:
        left = sum(not (sweep.run_dir(p) / DONE).exists() for p in sweep.points)
        print(f"rlhf sweep: ran {len(ran)} run(s) into {sweep.out / 'runs'}; {left} unfinished point(s) remain "
              "(rerun to continue)")
    return 0
