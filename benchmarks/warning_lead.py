"""Lead time of the collapse warning on recorded organism runs (issue 15.2).

    python benchmarks/warning_lead.py RUN [RUN ...] [--docs docs] [--fixtures tests/testbed/fixtures/warning]

For each run (a `rlhf train` directory with ``metrics.jsonl``, e.g. those of
``benchmarks/testbed_matrix.py`` and of ``rlhf sweep configs/testbed/bai_sweep.yaml``, or a
recorded fixture ``*.jsonl`` of an earlier build; exact-reward runs are the controls) it replays
the recorded metrics through the detectors (``rlhf.metrics.detect_run``, default thresholds) and
reports: the step the collapse warning is raised, the first step whose raw mean length is below
half its baseline, the lead time between them, the length-collapse verdict, and the hockey-stick
warning. Writes ``warning_lead.md`` and ``warning_lead.png`` (length per run with the warning and
the half-length step marked) to ``--docs``; ``--fixtures`` writes each run's few replayed series
as a small JSONL for ``tests/testbed/test_warning_fixtures.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KEEP = ("step", "rollout/length_mean", "advantage/length_corr", "reward/length_corr", "reward/mean", "reward/std")


def run_name(p: Path) -> str:
    """A short, readable run name: ``rm_mix_s0`` as is, a sweep point ``alpha_0.1__seed=0`` as
    ``bai_a0.1_s0``, a fixture file by its stem."""
    name = p.stem if p.suffix == ".jsonl" else p.name
    if name.startswith("alpha_") and "__seed=" in name:
        a, seed = name[len("alpha_"):].split("__seed=")
        return f"bai_a{a}_s{seed}"
    return name


def runs_from(paths: list[str]) -> dict[str, list[dict]]:
    """Run directories (their ``metrics.jsonl``) or recorded fixtures (``*.jsonl``), by name."""
    out = {}
    for p in map(Path, paths):
        f = p if p.suffix == ".jsonl" else p / "metrics.jsonl"
        if f.exists() and f.name != "expected.json":
            out[run_name(p)] = [json.loads(x) for x in f.read_text().splitlines()]
    return out


def is_control(name: str) -> bool:
    """The exact-reward runs are the controls (no collapse expected); every other run is a collapse run."""
    return "exact" in name


def evaluate(records: list[dict]) -> dict:
    from rlhf.metrics.detectors import detect_run
    from rlhf.metrics.warning import lead_time

    v = detect_run(records)
    steps = [r["step"] for r in records]
    lengths = [r["rollout/length_mean"] for r in records]
    base = sorted(lengths[:3])[1]
    half = next((s for s, x in zip(steps, lengths) if x < 0.5 * base), None)
    w = v["collapse_warning"]
    return {"warning": w.step, "half": half, "lead": lead_time(steps, lengths, w.step),
            "collapse": v["length_collapse"].verdict, "hockey_warning": v["hockey_stick_warning"].step,
            "steps": steps, "lengths": lengths}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--docs", default="docs")
    ap.add_argument("--fixtures", default=None)
    ns = ap.parse_args()
    runs = runs_from(ns.runs)
    res = {name: evaluate(recs) for name, recs in runs.items()}
    lines = ["| run | warning at step | raw length < half baseline at step | lead (steps) | length collapse | hockey-stick warning |",
             "|---|---|---|---|---|---|"]
    for name, r in res.items():
        lines.append(f"| {name} | {r['warning'] or '-'} | {r['half'] or '-'} | "
                     f"{r['lead'] if r['lead'] is not None else '-'} | {r['collapse']} | {r['hockey_warning'] or '-'} |")
    col = [n for n in res if not is_control(n)]
    ctl = [n for n in res if is_control(n)]
    ahead = sum(1 for n in col if res[n]["lead"] is not None and res[n]["lead"] >= 3)
    leads = sorted(res[n]["lead"] for n in col if res[n]["lead"] is not None)
    summary = [f"- collapse runs warned >= 3 steps before the raw length halves: {ahead}/{len(col)}"
               + (f" (lead {leads[0]}-{leads[-1]} steps, median {leads[len(leads) // 2]})" if leads else ""),
               f"- controls (exact reward) warned: {sum(res[n]['warning'] is not None for n in ctl)}/{len(ctl)}",
               f"- hockey-stick warnings: {sum(res[n]['hockey_warning'] is not None for n in ctl)}/{len(ctl)} controls, "
               f"{sum(res[n]['hockey_warning'] is not None for n in col)}/{len(col)} collapse runs"]
    table = "\n".join(lines) + "\n\n" + "\n".join(summary)
    print(table)
    docs = Path(ns.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "warning_lead.md").write_text(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, names, title in ((axes[0], col, "collapse runs"), (axes[1], ctl, "controls (exact reward)")):
        for i, name in enumerate(names):
            r, c = res[name], f"C{i % 10}"
            base = sorted(r["lengths"][:3])[1]
            ax.plot(r["steps"], [x / base for x in r["lengths"]], color=c, lw=1, label=name)
            if r["warning"] is not None:
                ax.plot([r["warning"]], [r["lengths"][r["steps"].index(r["warning"])] / base], "v", color=c)
            if r["half"] is not None:
                ax.plot([r["half"]], [r["lengths"][r["steps"].index(r["half"])] / base], "o", color=c, mfc="none")
        ax.axhline(0.5, color="k", ls=":", lw=0.8)
        ax.set_xlabel("step")
        ax.set_title(f"{title}: warning (triangle), length < half (circle)", fontsize=9)
        ax.legend(fontsize=5, ncol=2)
    axes[0].set_ylabel("mean response length / baseline")
    fig.tight_layout()
    fig.savefig(docs / "warning_lead.png", dpi=110)
    if ns.fixtures:
        fx = Path(ns.fixtures)
        fx.mkdir(parents=True, exist_ok=True)
        for name, recs in runs.items():
            rows = [{k: r[k] for k in KEEP if k in r} for r in recs]
            (fx / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
        (fx / "expected.json").write_text(json.dumps({n: {"warning": r["warning"], "lead": r["lead"]}
                                                      for n, r in res.items()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
