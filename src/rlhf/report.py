"""`rlhf report RUN_DIR [RUN_DIR ...] --out DIR`: the paper's figures and a summary table.

Reads each run's ``metrics.jsonl`` and its resolved ``config.yaml`` (legend label, length
buckets and detector thresholds), then writes

    reward_buckets.png   reward against step per length bucket, runs overlaid (BAI Figs. 2, 6, 7)
    reward.png           batch reward with the hockey-stick onset / trough / recovery marked
    length.png           mean response length with a +-std band, collapse marked (Figs. 3a, 4)
    kl.png               KL training-vs-sampling policy, to the reference, rollout-vs-trainer (Figs. 3c, 5),
                         with the length-collapse and reward-decline onsets marked
    length_heatmap.png   per run: steps on x, length buckets on y, response counts as color (from
                         ``reward/bucket_XX_count``), mean length and collapse onset drawn over it
    summary.md           per run: final reward, minimum length, collapse and hockey-stick verdicts,
                         the early warnings' steps, the actions taken (``stability_events.jsonl``)
                         and the pre-flight length-bias check of the first batch

into ``--out`` (built in a temporary sibling directory, then renamed into place).

Bad input stops before anything is written, with one error naming the file and line:
``metrics.jsonl`` is read strictly: every line must be a JSON object with an integer ``step``
and numeric (or null) values; a corrupt line anywhere but the end is an error. Only an
incomplete LAST line (a run still writing, or one killed mid-write) is skipped, with a warning
naming ``file:line`` on stderr. A step logged twice keeps its last record (with a warning).

Outputs are owned (``bairlhf.outputs``): an existing ``--out`` is replaced only with
``--force`` and only when an earlier ``rlhf report`` wrote it (its marker file); an ``--out``
that is, contains or lies inside an input run directory is refused, so a report never touches
a run's checkpoints or metrics.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bairlhf.errors import UserError
from bairlhf.outputs import check_output, mark_output, replace_dir
from bairlhf.yamlio import load_mapping, load_yaml
from rlhf.metrics.batch import bucket_key
from rlhf.metrics.config import StabilityConfig
from rlhf.metrics.detectors import detect_run, rolling_median
from rlhf.metrics.logger import EVENTS_FILE, METRICS_FILE, read_jsonl
from rlhf.metrics.preflight import CORR, GAP, GAP_STD, SPEARMAN, THRESHOLD, bucket_mean_key, preflight_line

COMMAND = "rlhf report"
"""The owner name in the marker file of a report directory."""
FIGURES = ("reward_buckets.png", "reward.png", "length.png", "kl.png", "length_heatmap.png", "summary.md")


class ReportError(UserError):
    """Bad ``rlhf report`` input; the message names the run directory, file and line."""


def warn(msg: str) -> None:
    """One warning line on stderr."""
    print(f"rlhf report: warning: {msg}", file=sys.stderr)


def read_metrics(path: Path) -> list[dict]:
    """The step records of a ``metrics.jsonl``, checked line by line (see the module docstring).

    Returns records sorted by step (a duplicate step keeps its last record)."""
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as e:
        raise ReportError(f"{path}: cannot read ({e.strerror})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    by_step: dict[int, dict] = {}
    dups = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        last = n == len(lines)
        try:
            rec = json.loads(raw.decode())
        except (UnicodeDecodeError, ValueError) as e:
            if last:
                warn(f"{path}:{n}: incomplete last line skipped (a run still writing, or killed mid-write)")
                continue
            raise ReportError(f"{path}:{n}: not a JSON line ({e}); fix or remove the line") from None
        if not isinstance(rec, dict):
            raise ReportError(f"{path}:{n}: expected a JSON object {{\"step\": ..., ...}}, got {type(rec).__name__} "
                              f"{raw.decode(errors='replace').strip()[:40]!r}")
        step = rec.get("step")
        if type(step) is not int or step < 0:
            raise ReportError(f"{path}:{n}: \"step\" must be an integer >= 0, got {step!r}")
        for k, v in rec.items():
            if v is not None and (type(v) not in (int, float)):
                raise ReportError(f"{path}:{n}: {k}: expected a number or null, got {v!r}"[:200])
        if step in by_step:
            dups.append(step)
        by_step[step] = rec
    if dups:
        warn(f"{path}: step(s) {', '.join(map(str, sorted(set(dups))[:5]))} logged twice; the last record is used")
    return [by_step[k] for k in sorted(by_step)]

BUCKET_RE = re.compile(r"^reward/bucket_(\d+)_mean$")
KL_PANELS = [("kl/policy_vs_sampling", "KL(sampling || training policy)"),
             ("kl/to_reference", "KL to reference (k3)"),
             ("kl/rollout_vs_trainer", "rollout engine vs trainer (k3)")]


@dataclass
class Run:
    """One run directory, loaded."""

    path: Path
    """The run directory."""
    label: str
    """Legend label: initialization and BAI ratio when known, else the directory name."""
    records: list[dict]
    """Per-step records of ``metrics.jsonl``, sorted by step."""
    cfg: StabilityConfig
    """Detector thresholds (the run config's ``metrics:`` section, else defaults)."""
    verdicts: dict[str, Any] = field(default_factory=dict)
    """``detect_run`` output: length_collapse, hockey_stick, buckets."""

    def series(self, key: str, min_count_key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        st, vals = [], []
        for r in self.records:
            v = r.get(key)
            if v is None or not math.isfinite(float(v)):
                continue
            if min_count_key is not None and float(r.get(min_count_key) or 0) < self.cfg.bucket_min_count:
                continue
            st.append(int(r["step"]))
            vals.append(float(v))
        return np.asarray(st, dtype=np.int64), np.asarray(vals, dtype=np.float64)


def _find_key(node: Any, names: tuple[str, ...]) -> Any:
    """First scalar value under a key in ``names`` anywhere in a nested dict."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in names and isinstance(v, (int, float, str)) and not isinstance(v, bool):
                return v
        for v in node.values():
            found = _find_key(v, names)
            if found is not None:
                return found
    return None


def run_label(run_dir: Path, config: dict | None) -> str:
    """``<init> (α=a, β=1-a)`` from the resolved config: the actor's initialization (a path's
    name, ``tiny``, or ``BAI merge`` when built from a recipe or a sweep's ``alpha_<a>``
    output) and the BAI base weight alpha
    (a config key ``alpha``/``ratio``, an ``alpha_<a>`` actor path of a sweep, or the recipe's
    ``alpha``). Falls back to the run directory's name."""
    if not config:
        return run_dir.name
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    actor = model.get("actor") or _find_key(config, ("init",))
    recipe = model.get("bai_recipe")
    alpha = _find_key(config, ("alpha", "ratio"))
    if alpha is None and isinstance(actor, str):
        m = re.search(r"alpha[_=-]?([0-9]*\.?[0-9]+)", actor)
        alpha = m.group(1) if m else None
    if alpha is None and recipe:
        for p in (Path(recipe), run_dir / recipe, run_dir / "bai_recipe.yaml"):   # the trainer keeps a copy
            if p.is_file():
                try:
                    alpha = _find_key(load_yaml(p, "BAI recipe") or {}, ("alpha",))
                except UserError:     # the label only: an unreadable recipe leaves the ratio out
                    alpha = None
                break
    init = Path(str(actor).rstrip("/")).name if actor else None
    if recipe or (init and re.fullmatch(r"alpha_[0-9.eE+-]+", init)):   # a recipe, or a sweep's merge output
        init = "BAI merge"
    if init is None and alpha is None:
        return run_dir.name
    label = init or "init"
    try:
        a = float(alpha)
        label += f" (α={a:g}, β={1 - a:g})"
    except (TypeError, ValueError):
        pass
    return label


def load_run(run_dir: Path) -> Run:
    """Load one run; raises ``ReportError`` naming the file (and line) at fault."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir / METRICS_FILE}: no such file ({run_dir} is not a directory)")
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise ReportError(f"{metrics_path}: no such file (is {run_dir} a run directory?)")
    records = read_metrics(metrics_path)
    if not records:
        raise ReportError(f"{metrics_path}: holds no step records yet")
    config: dict = {}
    cfg_path = run_dir / "config.yaml"
    if cfg_path.exists():
        config = load_mapping(cfg_path, "run config")
    metrics_cfg = config.get("metrics")
    if metrics_cfg is not None and not isinstance(metrics_cfg, dict):
        raise ReportError(f"{cfg_path}: metrics: expected a mapping, got {metrics_cfg!r}"[:200])
    try:
        cfg = StabilityConfig.from_dict(metrics_cfg or {})
    except UserError as e:
        raise ReportError(f"{cfg_path}: {e}") from None
    run = Run(path=run_dir, label=run_label(run_dir, config), records=records, cfg=cfg)
    run.verdicts = detect_run(records, cfg)
    return run


# ----------------------------------------------------------------------------- figures

def _bucket_ids(runs: list[Run]) -> list[int]:
    ids = {int(m.group(1)) for r in runs for rec in r.records for k in rec if (m := BUCKET_RE.match(k))}
    return sorted(ids)


def _bucket_title(i: int, cfg: StabilityConfig) -> str:
    return cfg.bucket_label(i)


def _plot_line(ax, st, vals, color, label, cfg: StabilityConfig):
    if st.size == 0:
        return
    ax.plot(st, vals, color=color, alpha=0.25, lw=0.8)
    ax.plot(st, rolling_median(vals, cfg.smooth_window), color=color, lw=1.6, label=label)


def _mark(ax, step, color, style, text=None, side="right"):
    if step is None:
        return
    ax.axvline(step, color=color, ls=style, lw=1.0, alpha=0.8)
    if text:
        ax.annotate(text, (step, 1.0), xycoords=("data", "axes fraction"), fontsize=7, color=color,
                    rotation=90, va="top", ha=side)


def _mark_hockey(ax, v, color, annotate=True):
    if v is None or v.onset_step is None:
        return
    _mark(ax, v.onset_step, color, ":", "decline" if annotate else None)
    _mark(ax, v.trough_step, color, "--", "trough" if annotate else None, side="left")
    _mark(ax, v.recovery_step, color, "-.", "recovered" if annotate else None)


def _colors(n: int) -> list:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def finish_step_panels(axes, keys: list[tuple[str, str]], fontsize: int = 8) -> None:
    """Titles, x labels and rate limits of a row of per-step panels (``keys``: metric, title);
    the legend goes on the first panel. Shared by the organism figures (demo, testbed matrix)."""
    for ax, (k, title) in zip(axes, keys):
        if k in ("gold/accuracy", "rollout/think_rate"):
            ax.set_ylim(-0.03, 1.03)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO step")
    axes[0].legend(fontsize=fontsize)


def plot_reward_buckets(runs: list[Run], path: Path) -> None:
    import matplotlib.pyplot as plt

    ids = _bucket_ids(runs)
    cfg = runs[0].cfg
    ncols = 5 if len(ids) > 4 else max(1, len(ids))
    nrows = max(1, math.ceil(len(ids) / ncols))
    height = 2.4 * nrows + 0.6
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, height), squeeze=False)
    colors = _colors(len(runs))
    for ax, i in zip(axes.flat, ids):
        for run, c in zip(runs, colors):
            st, vals = run.series(bucket_key(i, "mean"), bucket_key(i, "count"))
            _plot_line(ax, st, vals, c, run.label, run.cfg)
            _mark_hockey(ax, run.verdicts["buckets"].get(i), c, annotate=False)
        ax.set_title(_bucket_title(i, cfg), fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(ids):]:
        ax.axis("off")
    if not ids:
        axes.flat[0].text(0.5, 0.5, "no per-bucket reward metrics", ha="center", va="center")
    legend: dict = {}
    for ax in axes.flat:                    # a run may be absent from some buckets
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    top = 1 - 0.45 / height if legend else 1
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="upper center", ncol=min(len(legend), 4), fontsize=9)
    fig.supxlabel("step")
    fig.supylabel("reward")
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=110, bbox_inches="tight")  # a wide legend over a narrow grid stays whole
    plt.close(fig)


def plot_reward(runs: list[Run], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run, c in zip(runs, _colors(len(runs))):
        st, vals = run.series("reward/mean")
        _plot_line(ax, st, vals, c, f"{run.label}: {run.verdicts['hockey_stick'].verdict}", run.cfg)
        _mark_hockey(ax, run.verdicts["hockey_stick"], c)
    ax.set_xlabel("step")
    ax.set_ylabel("reward/mean")
    ax.set_title("Reward (hockey stick: decline / trough / recovery marked)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_length(runs: list[Run], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run, c in zip(runs, _colors(len(runs))):
        st, mean = run.series("rollout/length_mean")
        by_step = {int(r["step"]): r.get("rollout/length_std") for r in run.records}
        std = np.array([by_step.get(int(s)) if by_step.get(int(s)) is not None else np.nan for s in st], dtype=float)
        lc = run.verdicts["length_collapse"]
        ax.plot(st, mean, color=c, lw=1.6, label=f"{run.label}: {lc.verdict}")
        if np.isfinite(std).any():
            ax.fill_between(st, mean - std, mean + std, color=c, alpha=0.15, lw=0)
        _mark(ax, lc.onset_step, c, ":", "collapse")
        _mark(ax, lc.min_step, c, "--", "minimum")
        _mark(ax, lc.recovery_step, c, "-.", "recovered")
    ax.set_xlabel("step")
    ax.set_ylabel("response length (tokens)")
    ax.set_title("Mean response length ± std (sequence-length collapse marked)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kl(runs: list[Run], path: Path) -> None:
    import matplotlib.pyplot as plt

    panels = [(k, t) for k, t in KL_PANELS if any(run.series(k)[0].size for run in runs)] or KL_PANELS[:1]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for run, c in zip(runs, _colors(len(runs))):
            st, vals = run.series(key)
            if st.size:
                ax.plot(st, vals, color=c, lw=1.2, label=run.label)
            first = ax is axes.flat[0]
            _mark(ax, run.verdicts["length_collapse"].onset_step, c, ":", "collapse" if first else None)
            _mark(ax, run.verdicts["hockey_stick"].onset_step, c, "--", "decline" if first else None, side="left")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def length_counts(run: Run) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(steps, edges, counts)`` of a run's per-step length histogram from ``reward/bucket_XX_count``:
    ``counts[b, s]`` responses of step ``steps[s]`` in bucket ``b`` = ``[edges[b], edges[b+1])`` tokens,
    buckets above the highest non-empty one dropped, the open-ended last bucket closed at the run's
    largest ``rollout/length_max`` + 1. Steps without bucket counts are left out."""
    w, nb = run.cfg.bucket_width, run.cfg.num_buckets
    steps, cols, top = [], [], 0.0
    for r in run.records:
        col = [r.get(bucket_key(i, "count")) for i in range(nb)]
        if all(c is None for c in col):
            continue
        steps.append(int(r["step"]))
        cols.append([float(c or 0.0) for c in col])
        if r.get("rollout/length_max") is not None:
            top = max(top, float(r["rollout/length_max"]) + 1.0)
    if not cols:
        return np.zeros(0, np.int64), np.zeros(1), np.zeros((0, 0))
    counts = np.asarray(cols, dtype=np.float64).T
    used = np.nonzero(counts.sum(1))[0]
    nb_used = int(used[-1]) + 1 if used.size else 1
    counts = counts[:nb_used]
    edges = np.arange(nb_used + 1, dtype=np.float64) * w
    if nb_used == nb:
        edges[-1] = max(edges[-2] + w, top)
    return np.asarray(steps, dtype=np.int64), edges, counts


def plot_length_heatmap(runs: list[Run], path: Path) -> None:
    """One panel per run: response-length histogram per step (counts as color), the mean length
    line and the length-collapse onset over it. A collapse shows as the mass sliding to the bottom."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 2.6 * len(runs) + 0.4), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        steps, edges, counts = length_counts(run)
        if steps.size == 0:
            ax.text(0.5, 0.5, "no length-bucket counts (reward/bucket_XX_count)", ha="center", va="center",
                    transform=ax.transAxes)
        else:
            mid = steps.astype(float)
            xe = np.concatenate([[mid[0] - 0.5], (mid[1:] + mid[:-1]) / 2, [mid[-1] + 0.5]])
            mesh = ax.pcolormesh(xe, edges, np.ma.masked_equal(counts, 0), cmap="viridis", shading="flat")
            fig.colorbar(mesh, ax=ax, label="responses", pad=0.01)
            st, mean = run.series("rollout/length_mean")
            if st.size:
                ax.plot(st, mean, color="tab:red", lw=1.4, label="mean length")
                ax.legend(fontsize=7, loc="upper right")
            _mark(ax, run.verdicts["length_collapse"].onset_step, "black", ":", "collapse")
            ax.set_facecolor("0.93")                       # light grey: no response of that length
            ax.set_ylim(edges[0], edges[-1])
        ax.set_title(f"{run.label}: response length per step ({run.cfg.bucket_width}-token buckets)", fontsize=9)
        ax.set_ylabel("length (tokens)")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- summary table

def preflight_record(run: Run) -> dict | None:
    """The record holding the run's pre-flight length-bias metrics (the first step's), or None."""
    return next((r for r in run.records if CORR in r or GAP_STD in r), None)


def preflight_rows(run: Run) -> list[str]:
    """summary.md lines of the pre-flight check: the sentence, the numbers, per-bucket means."""
    rec = preflight_record(run)
    if rec is None:
        return []
    lines = ["", f"Pre-flight (first batch, before any update): {preflight_line(rec)}", "",
             "| pre-flight length bias | value |", "|---|---|",
             f"| score-length correlation (Pearson / Spearman) | {_fmt(rec.get(CORR), 3)} / {_fmt(rec.get(SPEARMAN), 3)} |",
             f"| long - short score gap (reward std / reward units) | {_fmt(rec.get(GAP_STD), 3)} / {_fmt(rec.get(GAP), 3)} |",
             f"| long means over (tokens) | {_fmt(rec.get(THRESHOLD))} |"]
    for i in range(run.cfg.num_buckets):
        v = rec.get(bucket_mean_key(i))
        if v is not None:
            lines.append(f"| mean score, {_bucket_title(i, run.cfg)} | {_fmt(v)} |")
    return lines


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "-" if not math.isfinite(x) else f"{x:.{digits}g}"
    return str(x)


def summary_markdown(runs: list[Run]) -> str:
    lines = ["# Run report", "",
             "| run | last step | final reward (smoothed) | min length (step) | length collapse | hockey stick |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        st_r, rew = run.series("reward/mean")
        st_l, length = run.series("rollout/length_mean")
        lc, hs = run.verdicts["length_collapse"], run.verdicts["hockey_stick"]
        min_len = f"{_fmt(float(length.min()))} ({int(st_l[np.argmin(length)])})" if length.size else "-"
        final = float(rolling_median(rew, run.cfg.smooth_window)[-1]) if rew.size else None
        lines.append(f"| {run.label} | {int(run.records[-1]['step'])} | {_fmt(final)} "
                     f"| {min_len} | {lc.verdict} | {hs.verdict} |")
    for run in runs:
        lc, hs = run.verdicts["length_collapse"], run.verdicts["hockey_stick"]
        lines += ["", f"## {run.label}", "", f"Run directory: `{run.path}`", "",
                  "| detector | value |", "|---|---|",
                  f"| length collapse | {lc.verdict} |",
                  f"| baseline length | {_fmt(lc.baseline)} |",
                  f"| collapse onset step | {_fmt(lc.onset_step)} |",
                  f"| depth (min / baseline) | {_fmt(lc.depth)} |",
                  f"| minimum length (step) | {_fmt(lc.min_value)} ({_fmt(lc.min_step)}) |",
                  f"| length recovery step | {_fmt(lc.recovery_step)} |",
                  f"| hockey stick | {hs.verdict} (phase: {hs.phase}) |",
                  f"| reward baseline / scale | {_fmt(hs.baseline)} / {_fmt(hs.scale)} |",
                  f"| decline onset step | {_fmt(hs.onset_step)} |",
                  f"| drop depth (z / reward units) | {_fmt(hs.drop_depth)} / {_fmt(hs.drop_value)} |",
                  f"| trough step, length | {_fmt(hs.trough_step)}, {_fmt(hs.trough_length)} |",
                  f"| decline length (steps) | {_fmt(hs.decline_length)} |",
                  f"| half / full recovery step | {_fmt(hs.half_recovery_step)} / {_fmt(hs.recovery_step)} |",
                  f"| recovery slope (reward / step) | {_fmt(hs.recovery_slope)} |",
                  f"| severity (area below baseline, z·steps) | {_fmt(hs.severity)} |"]
        cw, hw = run.verdicts["collapse_warning"], run.verdicts["hockey_stick_warning"]
        lines += [f"| collapse warning step (early warning) | {_fmt(cw.step)} |",
                  f"| hockey-stick warning step | {_fmt(hw.step)} |"]
        actions = [e for e in read_jsonl(run.path / EVENTS_FILE) if "action" in e]
        lines += [f"| action at step {e.get('step')} | {e.get('action')}: {e.get('reason')} |" for e in actions]
        lines += preflight_rows(run)
        if run.verdicts["buckets"]:
            lines += ["", "| length bucket | verdict | onset | depth (z) | trough (length) | recovery | slope |",
                      "|---|---|---|---|---|---|---|"]
            for i, v in sorted(run.verdicts["buckets"].items()):
                lines.append(f"| {_bucket_title(i, run.cfg)} | {v.verdict} | {_fmt(v.onset_step)} | "
                             f"{_fmt(v.drop_depth, 3)} | {_fmt(v.trough_step)} ({_fmt(v.trough_length)}) | "
                             f"{_fmt(v.recovery_step)} | {_fmt(v.recovery_slope, 3)} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- entry point

def legacy_report(path: Path) -> bool:
    """An ``rlhf report`` output from before marker files: a directory holding nothing but the
    report's own files (``FIGURES``); ``--force`` may replace it."""
    kids = list(path.iterdir()) if path.is_dir() else []
    return bool(kids) and all(k.is_file() and k.name in FIGURES for k in kids)


def write_report(run_dirs: list[Path], out: Path, force: bool = False) -> Path:
    """Load every run first (bad input stops before anything is written), then build the output
    in a temporary sibling directory and swap it into place (``bairlhf.outputs``: ``--force``
    replaces only an earlier report, never an input run directory or anything around one)."""
    out = Path(out)
    run_dirs = [Path(d) for d in run_dirs]
    check_output(out, COMMAND, inputs=run_dirs, force=force, legacy=legacy_report)
    runs = [load_run(d) for d in run_dirs]
    first = runs[0].cfg
    for run in runs[1:]:
        if (run.cfg.bucket_width, run.cfg.num_buckets) != (first.bucket_width, first.num_buckets):
            raise ReportError(
                f"{run.path / 'config.yaml'}: metrics.bucket_width/num_buckets {run.cfg.bucket_width}/"
                f"{run.cfg.num_buckets} differ from {runs[0].path}'s {first.bucket_width}/{first.num_buckets}; "
                "per-bucket curves of differently bucketed runs cannot be overlaid (report them separately)")
    import matplotlib

    matplotlib.use("Agg")
    seen: dict[str, int] = {}
    for run in runs:                       # two runs with the same init/ratio: add the dir name
        seen[run.label] = seen.get(run.label, 0) + 1
    for run in runs:
        if seen[run.label] > 1:
            run.label = f"{run.label} [{run.path.name}]"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise ReportError(f"--out {out}: cannot create the output directory ({e.strerror})") from None
    try:
        plot_reward_buckets(runs, tmp / "reward_buckets.png")
        plot_reward(runs, tmp / "reward.png")
        plot_length(runs, tmp / "length.png")
        plot_kl(runs, tmp / "kl.png")
        plot_length_heatmap(runs, tmp / "length_heatmap.png")
        (tmp / "summary.md").write_text(summary_markdown(runs))
        mark_output(tmp, COMMAND, runs=[str(r.path) for r in runs])
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
