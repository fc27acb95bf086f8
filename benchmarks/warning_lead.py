"""Lead time of the collapse warning on recorded organism runs (issue 15.2).

    python benchmarks/warning_lead.py RUN_DIR [RUN_DIR ...] [--docs docs] [--fixtures tests/testbed/fixtures/warning]

For each run (a `rlhf train` directory with ``metrics.jsonl``, e.g. those of
``benchmarks/testbed_matrix.py`` and of ``rlhf sweep configs/testbed/bai_sweep.yaml``) it replays
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


def runs_from(paths: list[str]) -> dict[str, list[dict]]:
    out = {}
    for p in paths:
        f = Path(p) / "metrics.jsonl"
        if f.exists():
            out[Path(p).name] = [json.loads(x) for x in f.read_text().splitlines()]
    return out


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
    table = "\n".join(lines)
    print(table)
    docs = Path(ns.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "warning_lead.md").write_text(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, r) in enumerate(res.items()):
        c = f"C{i % 10}"
        ax.plot(r["steps"], r["lengths"], color=c, label=name)
        if r["warning"] is not None:
            ax.axvline(r["warning"], color=c, ls="--", lw=1)
        if r["half"] is not None:
            ax.axvline(r["half"], color=c, ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("mean response length (tokens)")
    ax.set_title("Collapse warning (dashed) vs raw length below half its baseline (dotted)")
    ax.legend(fontsize=7)
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
