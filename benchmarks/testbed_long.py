"""Summarize the long-trace testbed runs (docs/testbed_long.md): a table and a figure from the logs.

    python benchmarks/testbed_long.py runs/testbed_long_ppo/* --docs docs

Reads each run's ``metrics.jsonl`` and ``config.yaml`` through ``rlhf.report.load_run`` (the
length-collapse detector with the config's thresholds), prints a markdown table (start = mean of
the first 3 steps, end = mean of the last 3) and writes ``DOCS/testbed_long.png`` (length,
reward-model score, think rate, critic explained variance, critic value mean, KL to the reference).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

COLS = [("rollout/length_mean", "length", 1), ("rollout/think_rate", "think", 2), ("reward/mean", "RM score", 3),
        ("gold/accuracy", "gold acc", 2), ("critic/explained_var", "critic EV", 2),
        ("critic/value_mean", "value mean", 3), ("critic/value_error", "value err", 4),
        ("kl/to_reference", "KL ref", 3)]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def row(run) -> str:
    lc = run.verdicts["length_collapse"]
    verdict = f"{lc.verdict} (step {lc.onset_step})" if lc.verdict != "none" else "none"
    cells = [run.path.name, str(len(run.records)), verdict]
    for key, _, nd in COLS:
        vals = [float(r[key]) for r in run.records if r.get(key) is not None]
        cells.append(f"{_mean(vals[:3]):.{nd}f} -> {_mean(vals[-3:]):.{nd}f}" if vals else "n/a")
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories")
    ap.add_argument("--docs", default=None, help="write testbed_long.png here")
    args = ap.parse_args(argv)
    from rlhf.demo import organism_figure
    from rlhf.report import load_run

    runs = [load_run(Path(r)) for r in args.runs if (Path(r) / "metrics.jsonl").exists()]
    head = ["run", "steps", "length collapse"] + [f"{name} (start -> end)" for _, name, _ in COLS]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    print("\n".join(row(r) for r in runs))
    if args.docs:
        panels = [("rollout/length_mean", "mean response length (tokens)"), ("reward/mean", "reward-model score"),
                  ("rollout/think_rate", "non-empty trace rate"), ("critic/explained_var", "critic explained variance"),
                  ("critic/value_mean", "critic value mean"), ("kl/to_reference", "KL to reference")]
        organism_figure(runs, Path(args.docs) / "testbed_long.png", keys=panels,
                        title="long-trace testbed: PPO with the short-answer reward model (dotted: detected length collapse)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
