"""The organism's collapse matrix: PPO conditions x seeds, with the project's length-collapse detector.

    python benchmarks/testbed_matrix.py --build runs/testbed --seeds 0 1 2 --steps 20

For each condition (default: ``rm_mix`` = reward model + mix init, ``exact_mix`` = exact-correctness
reward + mix init) and seed, runs ``rlhf train configs/testbed/<condition>.yaml`` on the cached build
(one subprocess per run, sequential), then reads each run's ``metrics.jsonl`` and applies the offline
length-collapse detector (``rlhf.metrics.detectors.detect_run``, the thresholds of the config's
``metrics:`` section). Writes a figure (mean length, reward, gold accuracy, think rate against step)
and a markdown table to ``--docs`` (default ``docs/``), and prints the table and whether the
expectation holds: collapse in every seed of ``rm_mix``, in none of ``exact_mix``.
Runs that already finished (their ``metrics.jsonl`` has ``--steps`` rows) are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPECT_COLLAPSE = {"rm_mix": True, "exact_mix": False, "both_mix": None, "grpo_rm_mix": None}


def run_one(condition: str, seed: int, steps: int, build: Path, run_dir: Path, extra: list[str]) -> float:
    """One PPO run through the real CLI; returns its wall time (0 when reused)."""
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
        return 0.0
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    models = build / "models"
    cmd = [sys.executable, "-m", "rlhf.cli", "train", str(REPO / "configs" / "testbed" / f"{condition}.yaml"),
           f"seed={seed}", f"run_dir={run_dir}", f"trainer.total_steps={steps}",
           f"model.actor={models / 'mix'}", f"model.critic={models / 'rm'}",
           f"data.path={build / 'data' / 'prompts.jsonl'}"]
    import yaml

    conf = yaml.safe_load((REPO / "configs" / "testbed" / f"{condition}.yaml").read_text())
    if (conf.get("reward") or {}).get("model"):  # a reward-model condition: the build's reward model
        cmd.append(f"reward.model={models / 'rm'}")
    cmd += extra
    env = dict(os.environ, RLHF_TESTBED_RM=str(models / "rm"), DS_ACCELERATOR="cpu", RAY_AUTH_MODE="disabled")
    t = time.time()
    print(f"[matrix] {condition} seed {seed}: {' '.join(cmd[3:])}", flush=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"{condition} seed {seed} failed (exit {rc}); see {log}:\n" + log.read_text()[-3000:])
    print(f"[matrix] {condition} seed {seed}: done in {time.time() - t:.0f}s", flush=True)
    return time.time() - t


def summarize(condition: str, seed: int, run_dir: Path) -> dict:
    import yaml

    from rlhf.metrics.detectors import StabilityConfig, detect_run

    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()).get("metrics") or {}
    verdict = detect_run(rows, StabilityConfig.from_dict(cfg))["length_collapse"]
    first, last = rows[0], rows[-1]
    return {
        "condition": condition, "seed": seed, "steps": len(rows), "collapse": verdict.verdict != "none",
        "verdict": verdict.verdict, "onset_step": verdict.onset_step,
        "depth": None if verdict.depth is None else round(verdict.depth, 3),
        "length_start": round(first["rollout/length_mean"], 1), "length_end": round(last["rollout/length_mean"], 1),
        "reward_start": round(first["reward/mean"], 3), "reward_end": round(last["reward/mean"], 3),
        "acc_start": round(first.get("gold/accuracy", float("nan")), 3),
        "acc_end": round(last.get("gold/accuracy", float("nan")), 3),
        "think_start": round(first.get("rollout/think_rate", float("nan")), 3),
        "think_end": round(last.get("rollout/think_rate", float("nan")), 3),
        "rows": rows,
    }


def figure(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlhf.report import finish_step_panels

    keys = [("rollout/length_mean", "mean response length (tokens)"), ("reward/mean", "reward (raw score)"),
            ("gold/accuracy", "gold accuracy (exact answer)"), ("rollout/think_rate", "non-empty trace rate")]
    colors = {"rm_mix": "tab:red", "exact_mix": "tab:blue", "both_mix": "tab:green", "grpo_rm_mix": "tab:purple"}
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for r in results:
        steps = [row["step"] for row in r["rows"]]
        for ax, (k, title) in zip(axes, keys):
            ax.plot(steps, [row.get(k, float("nan")) for row in r["rows"]], color=colors.get(r["condition"], "k"),
                    alpha=0.8, label=f"{r['condition']} (seed {r['seed']})" if k == keys[0][0] else None)
            if k == keys[0][0] and r["onset_step"] is not None:
                ax.axvline(r["onset_step"], color=colors.get(r["condition"], "k"), ls=":", lw=1)
    finish_step_panels(axes, keys, fontsize=7)
    fig.suptitle("rlhf testbed: reward model vs exact reward from the mix init (dotted: detected collapse onset)",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def table(results: list[dict]) -> str:
    cols = ["condition", "seed", "verdict", "onset_step", "depth", "length_start", "length_end", "reward_start",
            "reward_end", "acc_start", "acc_end", "think_start", "think_end"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in results]
    return "\n".join(lines)


def sweep_summary(sweep_out: Path, docs: Path) -> int:
    """``--sweep DIR``: the detector verdicts of a finished ``rlhf sweep`` (BAI ratio sweep) as a table
    and a figure (``docs/testbed_bai.md``, ``docs/testbed_bai.png``)."""
    import re

    results = []
    for run_dir in sorted((sweep_out / "runs").iterdir()):
        m = re.fullmatch(r"alpha_([0-9.]+)__seed=(\d+)", run_dir.name)
        if not m or not (run_dir / "metrics.jsonl").exists() or not (run_dir / "SWEEP_DONE").exists():
            continue
        results.append(summarize(f"alpha {m.group(1)}", int(m.group(2)), run_dir))
    if not results:
        print(f"testbed_matrix: no finished runs under {sweep_out / 'runs'}", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted({r["condition"] for r in results})
    cmap = plt.get_cmap("viridis")
    keys = [("rollout/length_mean", "mean response length (tokens)"), ("reward/mean", "reward-model score"),
            ("gold/accuracy", "gold accuracy (exact answer)"), ("rollout/think_rate", "non-empty trace rate")]
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for r in results:
        color = cmap(alphas.index(r["condition"]) / max(len(alphas) - 1, 1))
        steps = [row["step"] for row in r["rows"]]
        for ax, (k, _) in zip(axes, keys):
            ax.plot(steps, [row.get(k, float("nan")) for row in r["rows"]], color=color, alpha=0.8,
                    label=r["condition"] if (k == keys[0][0] and r["seed"] == min(x["seed"] for x in results)) else None)
    for ax, (k, title) in zip(axes, keys):
        if k in ("gold/accuracy", "rollout/think_rate"):
            ax.set_ylim(-0.03, 1.03)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO step")
    axes[0].legend(fontsize=7, title="base weight")
    fig.suptitle("rlhf testbed: BAI ratio sweep (instruct + reasoning 50/50, then base at alpha), reward model PPO",
                 fontsize=10)
    fig.tight_layout()
    docs.mkdir(parents=True, exist_ok=True)
    fig.savefig(docs / "testbed_bai.png", dpi=110)
    fired = {a: sum(r["collapse"] for r in results if r["condition"] == a) for a in alphas}
    runs = {a: sum(r["condition"] == a for r in results) for a in alphas}
    lines = [f"- {a}: length collapse detected in {fired[a]}/{runs[a]} seeds" for a in alphas]
    (docs / "testbed_bai.md").write_text(
        f"# Testbed BAI ratio sweep\n\nRuns: `{sweep_out}` (`rlhf sweep configs/testbed/bai_sweep.yaml`), summarized "
        f"with `python benchmarks/testbed_matrix.py --sweep {sweep_out}`\n\n" + table(results) + "\n\n"
        + "\n".join(lines) + "\n\n![bai sweep](testbed_bai.png)\n")
    print(table(results) + "\n" + "\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default="runs/testbed", help="the cached `rlhf testbed build` output")
    ap.add_argument("--conditions", nargs="+", default=["rm_mix", "exact_mix"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="runs/testbed_matrix", help="run directories")
    ap.add_argument("--docs", default="docs", help="where the figure and table go")
    ap.add_argument("--parallel", type=int, default=1, help="runs at a time (each starts its own local Ray)")
    ap.add_argument("overrides", nargs="*", help="extra key.sub=value overrides for every run")
    ap.add_argument("--sweep", help="summarize a finished BAI sweep's output directory instead (no runs)")
    args = ap.parse_args(argv)
    if args.sweep:
        return sweep_summary(Path(args.sweep), Path(args.docs))
    build, out = Path(args.build).resolve(), Path(args.out).resolve()
    if not (build / "models" / "rm").exists():
        print(f"testbed_matrix: no build at {build}; run `rlhf testbed build --out {args.build}` first", file=sys.stderr)
        return 2
    from concurrent.futures import ThreadPoolExecutor

    grid = [(c, s) for c in args.conditions for s in args.seeds]
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=max(args.parallel, 1)) as pool:
        list(pool.map(lambda cs: run_one(cs[0], cs[1], args.steps, build, out / f"{cs[0]}_s{cs[1]}",
                                         args.overrides), grid))
    wall = time.time() - t0
    results = [summarize(c, s, out / f"{c}_s{s}") for c, s in grid]
    docs = Path(args.docs)
    figure(results, docs / "testbed_matrix.png")
    md = table(results)
    fired = {c: sum(r["collapse"] for r in results if r["condition"] == c) for c in args.conditions}
    lines = [f"- {c}: length collapse detected in {fired[c]}/{len(args.seeds)} seeds" for c in args.conditions]
    ok = all(EXPECT_COLLAPSE.get(c) is None or (fired[c] == len(args.seeds) if EXPECT_COLLAPSE[c] else fired[c] == 0)
             for c in args.conditions)
    cmd = "python benchmarks/testbed_matrix.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (docs / "testbed_matrix.md").write_text(
        f"# Testbed collapse matrix\n\nCommand: `{cmd}` ({args.steps} PPO steps per run, "
        f"{wall / 60:.1f} min wall)\n\n" + md + "\n\n" + "\n".join(lines)
        + f"\n\nExpectation (collapse in every rm_mix seed, none with exact reward): {'met' if ok else 'NOT met'}\n"
        "\n![matrix](testbed_matrix.png)\n")
    print(md + "\n" + "\n".join(lines) + f"\nexpectation {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
