"""Search for alpha* = the largest SFT weight a with rho(M_a, D_cal) >= rho_min (equation 5).

``a`` is the weight of the SFT model: M_a = (1 - a) M + a M_sft (the paper's alpha); a = 0 is
the original reasoning model (rho = 1 by assumption, as in the paper), a = 1 the SFT model.

- ``grid_search``: Algorithm 1, every a in {0, 1/K, ..., 1}; alpha* is the largest feasible a.
- ``binary_search``: the paper's speed-up, assuming rho falls with a. It probes a = 1 first
  (if the SFT model still reasons enough, alpha* = 1), then bisects [lo, hi] with lo feasible
  and hi infeasible, stopping after ``max_steps`` probes in all or, with ``early_stop``, as soon
  as a probe has rho in [rho_min, 1) ("reasoning degrades rapidly around the critical ratio").
  If no probe is feasible, a = 0 is probed for the record and alpha* = 0.

Both take ``evaluate(a) -> (rho, extra)`` and record every probe (a, rho, seconds, extra).
Pure Python: no torch, no I/O except ``write_table`` / ``plot``.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

Evaluate = Callable[[float], "tuple[float, dict]"]


@dataclass
class Probe:
    """One evaluated merge."""

    step: int
    """Order of evaluation (1-based)."""
    sft_weight: float
    """a: weight of the SFT model in M_a = (1 - a) M + a M_sft."""
    rho: float
    """Estimated calibration reasoning rate of M_a."""
    seconds: float
    """Wall time of this probe (merge + estimate)."""
    extra: dict = field(default_factory=dict)
    """Estimator details (rho_mean, rho_count, forward calls, a compared estimator...)."""


@dataclass
class SearchResult:
    """Outcome of a search."""

    method: str
    """``grid`` or ``binary``."""
    sft_weight: float
    """alpha*: the largest probed a with rho >= rho_min (0 when none)."""
    rho: float | None
    """rho at alpha* (None if alpha* = 0 was assumed, not probed)."""
    rho_min: float
    """The threshold used."""
    probes: list[Probe]
    """Every probe in evaluation order."""
    stop_reason: str
    """Why the search ended."""


def _probe(evaluate: Evaluate, a: float, probes: list[Probe]) -> float:
    t0 = time.perf_counter()
    rho, extra = evaluate(a)
    probes.append(Probe(len(probes) + 1, a, float(rho), time.perf_counter() - t0, dict(extra)))
    return float(rho)


def grid_search(evaluate: Evaluate, k: int, rho_min: float) -> SearchResult:
    """Evaluate every a in {j / K}; alpha* = the largest a with rho >= rho_min (Algorithm 1)."""
    probes: list[Probe] = []
    best, best_rho = 0.0, None
    for j in range(k + 1):
        a = j / k
        rho = _probe(evaluate, a, probes)
        if rho >= rho_min:
            best, best_rho = a, rho
    return SearchResult("grid", best, best_rho, rho_min, probes, f"evaluated all {k + 1} grid points")


def binary_search(evaluate: Evaluate, rho_min: float, max_steps: int = 8, early_stop: bool = True) -> SearchResult:
    """Bisection on a, assuming rho decreases with a; at most ``max_steps`` probes (see module doc)."""
    probes: list[Probe] = []
    if _probe(evaluate, 1.0, probes) >= rho_min:
        return SearchResult("binary", 1.0, probes[-1].rho, rho_min, probes, "the SFT model (a=1) meets rho_min")
    lo, hi, lo_rho = 0.0, 1.0, None
    reason = f"reached max_steps={max_steps}"
    while len(probes) < max_steps:
        mid = (lo + hi) / 2
        rho = _probe(evaluate, mid, probes)
        if rho >= rho_min:
            lo, lo_rho = mid, rho
            if early_stop and rho < 1.0:
                reason = f"early stop: rho={rho:.4f} in [rho_min, 1)"
                break
        else:
            hi = mid
    if lo_rho is None:
        lo_rho = _probe(evaluate, 0.0, probes)
        reason += "; no probe met rho_min, alpha*=0 (the original model)"
    return SearchResult("binary", lo, lo_rho, rho_min, probes, reason)


def write_table(result: SearchResult, out_dir: Path) -> tuple[Path, Path]:
    """Write ``probes.csv`` and ``probes.jsonl`` (one row per probe, extra columns flattened)."""
    rows = [{"step": p.step, "sft_weight": p.sft_weight, "rho": p.rho, "seconds": p.seconds, **p.extra}
            for p in result.probes]
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    csv_path, jsonl_path = Path(out_dir) / "probes.csv", Path(out_dir) / "probes.jsonl"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    jsonl_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return csv_path, jsonl_path


def plot(result: SearchResult, path: Path, title: str = "") -> Path:
    """Plot rho against the SFT weight a: probes numbered in evaluation order, rho_min and alpha*."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    pts = sorted(result.probes, key=lambda p: p.sft_weight)
    ax.plot([p.sft_weight for p in pts], [p.rho for p in pts], "-", color="0.7", zorder=1)
    ax.scatter([p.sft_weight for p in result.probes], [p.rho for p in result.probes], zorder=2)
    for p in result.probes:
        ax.annotate(str(p.step), (p.sft_weight, p.rho), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(result.rho_min, ls="--", color="tab:red", label=f"rho_min = {result.rho_min:g}")
    ax.axvline(result.sft_weight, ls=":", color="tab:green", label=f"alpha* = {result.sft_weight:.4g}")
    ax.set_xlabel("sft_weight a   (M_a = (1 - a) M + a M_sft)")
    ax.set_ylabel("calibration reasoning rate rho")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.05)
    ax.set_title(title or f"{result.method} search")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def result_dict(result: SearchResult) -> dict:
    """The search result as plain data."""
    return asdict(result)
