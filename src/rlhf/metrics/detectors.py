"""Stability detectors: sequence-length collapse and the reward hockey stick (BAI paper 4.4-4.5).

Pure functions over a metric history (``steps``, ``values``), usable offline on a finished run
and online: ``StabilityMonitor`` re-runs the same functions on the history so far after each
step, so an online verdict at step t is exactly the offline verdict of the run cut at t.

Common machinery (thresholds are ``StabilityConfig`` fields):
- smoothing: causal rolling median over the last ``smooth_window`` observations (a one-step
  spike never moves it);
- baseline: median of the first ``baseline_steps`` raw values (step 0 rolls out the initial
  actor; the median survives one contaminated value);
- persistence: a condition holds only when it is true for ``persistence`` consecutive
  observations;
- early window: onsets count only within ``early_steps`` steps of the first step.

Length collapse: onset = first persistent smoothed length <= ``collapse_fraction`` x baseline;
depth = min smoothed / baseline; recovery = first persistent smoothed length >=
``recovery_fraction`` x baseline after the minimum. Verdict ``none`` / ``collapsed`` / ``recovered``.

Hockey stick: z = (smoothed reward - baseline) / scale, scale = per-response reward std at the
start (``reward/std``) or, when unknown, the series' own step-to-step noise. A decline starts
when z stays <= -max(``drop_z``, ``noise_k`` x noise / scale); the trough is the minimum until
the reward is back at baseline; half recovery = z >= -depth/2, recovery = z >= 0 (both
persistent); plateau = steps around the trough within ``plateau_tol`` x depth of the minimum;
decline length = steps from the last point within ``plateau_tol`` x depth of the baseline to the
plateau's start (the decline's own duration, measured between the same fractions of the depth
as the plateau, so smoothing lag and the decline threshold cancel); slope = least-squares slope
of the raw reward over ``slope_window`` steps after the trough.
Class: ``no_drop`` (no decline), ``monotone_decline`` (no half recovery), ``v_shape`` (plateau
< max(``plateau_min_steps``, ``v_plateau_ratio`` x decline length) and half recovery within
max(``v_max_steps``, ``v_recovery_ratio`` x decline length) steps of the trough), else
``hockey_stick``. The V / hockey-stick boundary thus scales with the decline: a linear V with
arms of L steps has plateau ~ decline length ~ L/2 and half recovery ~ L/2 after the trough at
any L, while a hockey stick's plateau and slow recovery are long against its decline.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from rlhf.metrics.batch import bucket_key
from rlhf.metrics.config import StabilityConfig
from rlhf.metrics.warning import BIAS_KEYS, WarningVerdict, collapse_warning, hockey_stick_warning

__all__ = ["DETECTORS", "Detector", "WarningVerdict", "HOCKEY_CLASS_CODES", "PHASE_CODES", "VERDICT_CODES", "HockeyStickVerdict", "LengthCollapseVerdict",
           "StabilityConfig", "StabilityMonitor", "detect_hockey_stick", "detect_length_collapse", "detect_run",
           "rolling_median", "step_noise"]


@dataclass
class LengthCollapseVerdict:
    """Sequence-length collapse on one mean-length series."""

    verdict: str = "none"
    """``none``, ``collapsed`` (still below the recovery level) or ``recovered``."""
    baseline: float = math.nan
    """Initial mean length (median of the first ``baseline_steps`` values)."""
    onset_step: int | None = None
    """First step of the persistent drop below ``collapse_fraction`` x baseline."""
    depth: float | None = None
    """Minimum smoothed length / baseline (0.3: fell to 30% of the start)."""
    min_step: int | None = None
    """Step of the smoothed minimum."""
    min_value: float | None = None
    """Smoothed mean length at the minimum."""
    recovery_step: int | None = None
    """First step back at >= ``recovery_fraction`` x baseline (persistent), or None."""


@dataclass
class HockeyStickVerdict:
    """Reward decline / trough / recovery on one reward series."""

    verdict: str = "no_drop"
    """``no_drop``, ``v_shape``, ``hockey_stick`` or ``monotone_decline``."""
    phase: str = "baseline"
    """Where the series is at its last step: ``baseline``, ``decline``, ``trough``, ``recovering``, ``recovered``."""
    baseline: float = math.nan
    """Initial reward (median of the first ``baseline_steps`` values)."""
    scale: float = math.nan
    """Reward unit of z (per-response reward std at the start, or the series' step noise)."""
    onset_step: int | None = None
    """First step of the persistent decline."""
    drop_depth: float | None = None
    """Depth of the trough in z units (baseline - trough) / scale."""
    drop_value: float | None = None
    """Depth of the trough in reward units."""
    trough_step: int | None = None
    """Step of the smoothed minimum."""
    trough_value: float | None = None
    """Smoothed reward at the trough."""
    trough_length: int | None = None
    """Steps the plateau around the trough lasts."""
    decline_length: int | None = None
    """Steps of the decline itself: from the last point within ``plateau_tol`` x depth of the
    baseline to the plateau's start (the unit the V / hockey-stick boundary scales with)."""
    half_recovery_step: int | None = None
    """First step back above half the drop (persistent)."""
    recovery_step: int | None = None
    """First step back at the baseline (persistent)."""
    recovery_slope: float | None = None
    """Least-squares slope of the raw reward (units per step) over ``slope_window`` steps after the trough."""
    severity: float = 0.0
    """Area below the baseline, sum of max(0, -z) over the observations."""


VERDICT_CODES = {"none": 0, "collapsed": 1, "recovered": 2}
HOCKEY_CLASS_CODES = {"no_drop": 0, "v_shape": 1, "hockey_stick": 2, "monotone_decline": 3}
PHASE_CODES = {"baseline": 0, "decline": 1, "trough": 2, "recovering": 3, "recovered": 4}


# ----------------------------------------------------------------------------- shared pieces

def _as_series(steps: Sequence[float], values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(steps, dtype=np.int64).reshape(-1)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if s.shape != v.shape:
        raise ValueError(f"steps ({s.size}) and values ({v.size}) differ in length")
    keep = np.isfinite(v)
    return s[keep], v[keep]


def rolling_median(values: np.ndarray, window: int) -> np.ndarray:
    """Causal rolling median: point i is the median of values[max(0, i-window+1) : i+1]."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or window <= 1:
        return v.copy()
    padded = np.concatenate([np.full(window - 1, np.nan), v])
    windows = np.lib.stride_tricks.sliding_window_view(padded, window)
    out = np.empty_like(v)
    full = windows[window - 1:]
    out[window - 1:] = np.median(full, axis=1) if full.size else out[window - 1:]
    for i in range(min(window - 1, v.size)):   # the first points have shorter windows
        out[i] = np.median(v[: i + 1])
    return out


def _first_persistent(cond: np.ndarray, start: int, m: int) -> int | None:
    """First index i >= start with cond[i : i+m] all true (and i+m <= len)."""
    n = cond.size
    if n - start < m or start < 0:
        return None
    c = cond[start:].astype(np.int64)
    runs = np.convolve(c, np.ones(m, dtype=np.int64), mode="valid")  # runs[j] = sum c[j:j+m]
    hits = np.flatnonzero(runs == m)
    return int(start + hits[0]) if hits.size else None


def step_noise(values: np.ndarray) -> float:
    """Robust per-step noise std of a series: 1.4826 MAD of first differences / sqrt(2)."""
    if values.size < 3:
        return 0.0
    d = np.diff(values)
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2.0))


# ----------------------------------------------------------------------------- detectors

def detect_length_collapse(steps: Sequence[int], values: Sequence[float],
                           cfg: StabilityConfig | None = None) -> LengthCollapseVerdict:
    """Sequence-length collapse on a mean-length series (one value per step)."""
    cfg = cfg or StabilityConfig()
    s, v = _as_series(steps, values)
    if s.size < cfg.baseline_steps:
        return LengthCollapseVerdict()
    base = float(np.median(v[: cfg.baseline_steps]))
    out = LengthCollapseVerdict(baseline=base)
    if base <= 0:
        return out
    sm = rolling_median(v, cfg.smooth_window)
    in_window = (s - s[0]) <= cfg.early_steps
    onset = _first_persistent((sm <= cfg.collapse_fraction * base) & in_window, cfg.baseline_steps, cfg.persistence)
    if onset is None:
        return out
    i_min = onset + int(np.argmin(sm[onset:]))
    rec = _first_persistent(sm >= cfg.recovery_fraction * base, i_min + 1, cfg.persistence)
    return LengthCollapseVerdict(
        verdict="collapsed" if rec is None else "recovered", baseline=base, onset_step=int(s[onset]),
        depth=float(sm[i_min] / base), min_step=int(s[i_min]), min_value=float(sm[i_min]),
        recovery_step=None if rec is None else int(s[rec]))


def _ols_slope(x: np.ndarray, y: np.ndarray) -> float | None:
    if x.size < 2 or np.ptp(x) == 0:
        return None
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def reward_z(v: np.ndarray, cfg: StabilityConfig, scale: float | None):
    """(baseline, step noise, unit, smoothed series, z) of a reward series: z = (smoothed - baseline)
    / unit, unit = ``scale`` (reward std at the start) or, when unknown, the series' step noise."""
    base = float(np.median(v[: cfg.baseline_steps]))
    noise = step_noise(v)
    unit = float(scale) if scale is not None and scale > 0 and math.isfinite(scale) else (noise if noise > 0 else 1.0)
    sm = rolling_median(v, cfg.smooth_window)
    return base, noise, unit, sm, (sm - base) / unit


def detect_hockey_stick(steps: Sequence[int], values: Sequence[float], cfg: StabilityConfig | None = None,
                        scale: float | None = None) -> HockeyStickVerdict:
    """Reward hockey stick on a reward series; ``scale`` = per-response reward std at the start."""
    cfg = cfg or StabilityConfig()
    s, v = _as_series(steps, values)
    if s.size < cfg.baseline_steps:
        return HockeyStickVerdict()
    base, noise, unit, sm, z = reward_z(v, cfg, scale)
    severity = float(np.clip(-z, 0, None).sum())
    out = HockeyStickVerdict(baseline=base, scale=unit, severity=severity)
    thr = max(cfg.drop_z, cfg.noise_k * noise / unit)
    in_window = (s - s[0]) <= cfg.early_steps
    m = cfg.persistence
    onset = _first_persistent((z <= -thr) & in_window, cfg.baseline_steps, m)
    if onset is None:
        return out
    back = _first_persistent(z >= 0, onset + 1, m)
    end = back if back is not None else z.size
    i_tr = onset + int(np.argmin(z[onset:end]))
    depth = float(-z[i_tr])
    half = _first_persistent(z >= -depth / 2, i_tr + 1, m)
    near = np.flatnonzero(z <= z[i_tr] + cfg.plateau_tol * depth)   # the plateau: near points around the
    lo = hi = i_tr                                                     # trough, gaps shorter than m bridged
    while (prev := near[(near < lo) & (near >= max(onset, lo - m))]).size:
        lo = int(prev[0])
    while (nxt := near[(near > hi) & (near <= hi + m)]).size:
        hi = int(nxt[-1])
    plateau = int(s[hi] - s[lo] + 1)
    up = z >= -cfg.plateau_tol * depth       # decline start: last point of a persistent stretch near
    start = lo                               # the baseline (a brief noisy bump mid-decline is not one)
    while start > 0 and not up[max(0, start - m + 1): start + 1].all():
        start -= 1
    decline = max(1, int(s[lo] - s[start]))
    fit = (s >= s[i_tr]) & (s <= s[i_tr] + cfg.slope_window)
    slope = _ols_slope(s[fit].astype(np.float64), v[fit])
    if half is None:
        verdict = "monotone_decline"
    elif (plateau < max(cfg.plateau_min_steps, cfg.v_plateau_ratio * decline)
          and s[half] - s[i_tr] < max(cfg.v_max_steps, cfg.v_recovery_ratio * decline)):
        verdict = "v_shape"
    else:
        verdict = "hockey_stick"
    if back is not None:
        phase = "recovered"
    elif half is not None:
        phase = "recovering"
    elif z.size - 1 - i_tr < m:
        phase = "decline"
    else:
        phase = "trough"
    return HockeyStickVerdict(
        verdict=verdict, phase=phase, baseline=base, scale=unit, onset_step=int(s[onset]), drop_depth=depth,
        drop_value=depth * unit, trough_step=int(s[i_tr]), trough_value=float(sm[i_tr]), trough_length=plateau,
        decline_length=decline,
        half_recovery_step=None if half is None else int(s[half]),
        recovery_step=None if back is None else int(s[back]), recovery_slope=slope, severity=severity)


# ----------------------------------------------------------------------------- registry

LENGTH_KEY = "rollout/length_mean"
REWARD_KEY = "reward/mean"
REWARD_STD_KEY = "reward/std"
"""Context series: the per-response reward std at the start is the reward detectors' unit."""


BUCKET_SERIES = "reward/bucket_XX_mean"
"""Placeholder series name of a ``per_bucket`` detector: the bucket's own mean-score series."""


@dataclass(frozen=True)
class Detector:
    """One entry of ``DETECTORS``: a pure function over metric series, and what the online
    monitor reports of its verdict. The monitor and ``detect_run`` run every entry of this table,
    so a new detector is one function (its own module if it is long) plus one entry."""

    series: tuple[str, ...]
    """Metric keys it reads; it runs once the first is recorded (``per_bucket``: ``BUCKET_SERIES``)."""
    detect: Callable[..., Any]
    """``detect(series, cfg, scale) -> verdict`` (a dataclass): ``series`` maps each key to
    (steps, values) so far; ``scale`` = per-response reward std at the start."""
    state: Callable[[Any], str]
    """The verdict's state string; each change is a ``stability_events.jsonl`` event."""
    metrics: Callable[[Any, float, int, StabilityConfig], dict[str, float]]
    """``metrics(verdict, last smoothed value of the first series, its number of values, cfg)``
    -> ``{name: value}``, logged as ``stability/<name>`` (per bucket: ``stability/bucket_XX_<name>``)."""
    per_bucket: bool = False
    """Run once per length bucket on ``reward/bucket_XX_mean`` (buckets with enough responses)."""
    event: str | None = None
    """Event name (default: the registry key; per bucket ``<event>/bucket_XX``)."""


def _length_metrics(v: LengthCollapseVerdict, smoothed: float, n: int, cfg: StabilityConfig) -> dict[str, float]:
    out = {"length_ratio": float(smoothed / v.baseline)} if v.baseline > 0 else {}
    return {**out, "length_collapse": float(VERDICT_CODES[v.verdict])}


def _hockey_metrics(v: HockeyStickVerdict, smoothed: float, n: int, cfg: StabilityConfig) -> dict[str, float]:
    out = {"reward_z": float((smoothed - v.baseline) / v.scale)} if n >= cfg.baseline_steps else {}
    return {**out, "hockey_stick_phase": float(PHASE_CODES[v.phase]),
            "hockey_stick_class": float(HOCKEY_CLASS_CODES[v.verdict])}


def _warning_metric(name: str) -> Callable[[Any, float, int, StabilityConfig], dict[str, float]]:
    return lambda v, sm, n, cfg: {name: float(v.state == "warned")}


DETECTORS: dict[str, Detector] = {
    "length_collapse": Detector(
        (LENGTH_KEY,), lambda s, cfg, scale: detect_length_collapse(*s[LENGTH_KEY], cfg),
        lambda v: v.verdict, _length_metrics),
    "hockey_stick": Detector(
        (REWARD_KEY,), lambda s, cfg, scale: detect_hockey_stick(*s[REWARD_KEY], cfg, scale=scale),
        lambda v: f"{v.verdict}/{v.phase}", _hockey_metrics),
    "collapse_warning": Detector(
        (LENGTH_KEY, *BIAS_KEYS), lambda s, cfg, scale: collapse_warning(s, cfg),
        lambda v: v.state, _warning_metric("collapse_warning")),
    "hockey_stick_warning": Detector(
        (REWARD_KEY,), hockey_stick_warning, lambda v: v.state, _warning_metric("hockey_stick_warning")),
    "buckets": Detector(
        (BUCKET_SERIES,), lambda s, cfg, scale: detect_hockey_stick(*s[BUCKET_SERIES], cfg, scale=scale),
        lambda v: f"{v.verdict}/{v.phase}", lambda v, sm, n, cfg: {"hockey_stick_phase": float(PHASE_CODES[v.phase])},
        per_bucket=True, event="hockey_stick"),
}
"""Name -> detector, in the order the monitor runs them (the hockey stick per length bucket last)."""


# ----------------------------------------------------------------------------- online monitor

@dataclass
class StabilityMonitor:
    """Online detectors: feed each step's metrics, get ``stability/*`` metrics back.

    ``update(step, metrics)`` appends the step to its history, re-runs every entry of
    ``DETECTORS`` on the history and returns their metrics:
      stability/length_ratio          smoothed mean length / baseline
      stability/length_collapse       0 none, 1 collapsed, 2 recovered
      stability/reward_z              smoothed reward - baseline, in reward std units
      stability/hockey_stick_phase    0 baseline, 1 decline, 2 trough, 3 recovering, 4 recovered
      stability/hockey_stick_class    0 no_drop, 1 v_shape, 2 hockey_stick, 3 monotone_decline
      stability/collapse_warning      0 quiet, 1 warned (early warning, ``rlhf.metrics.warning``)
      stability/hockey_stick_warning  0 quiet, 1 warned
      stability/bucket_XX_hockey_stick_phase   the phase per length bucket
    Every verdict change is appended to ``events`` (``new_events`` holds the last step's):
    ``{"step", "detector", "from", "to", "evidence"}``. ``state_dict()`` is plain JSON.
    """

    config: StabilityConfig = field(default_factory=StabilityConfig)
    history: dict[str, list[list[float]]] = field(default_factory=dict)
    """Series name -> [steps, values]."""
    states: dict[str, str] = field(default_factory=dict)
    """Detector name -> last verdict/phase string."""
    events: list[dict] = field(default_factory=list)
    new_events: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.config, StabilityConfig):
            self.config = StabilityConfig.from_dict(self.config)

    def _append(self, name: str, step: int, value: float) -> None:
        st, vals = self.history.setdefault(name, [[], []])
        if st and step <= st[-1]:
            raise ValueError(f"StabilityMonitor: step {step} is not after the last step {st[-1]} of {name}")
        st.append(int(step))
        vals.append(float(value))

    def _change(self, step: int, detector: str, new: str, evidence: Any) -> None:
        old = self.states.get(detector)
        if old != new:
            self.states[detector] = new
            facts = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                     for k, v in dataclasses.asdict(evidence).items()}
            ev = {"step": int(step), "detector": detector, "from": old, "to": new, "evidence": facts}
            self.events.append(ev)
            self.new_events.append(ev)

    def reward_scale(self) -> float | None:
        """Per-response reward std at the start (median of the first ``baseline_steps`` values)."""
        vals = self.history.get(REWARD_STD_KEY, [[], []])[1][: self.config.baseline_steps]
        return float(np.median(vals)) if vals else None

    def _run(self, step: int, name: str, det: Detector, series: dict, prefix: str, scale) -> dict[str, float]:
        cfg = self.config
        st, vals = series[det.series[0]]
        verdict = det.detect(series, cfg, scale)
        sm = rolling_median(np.asarray(vals[-cfg.smooth_window:]), cfg.smooth_window)[-1]
        self._change(step, name, det.state(verdict), verdict)
        return {f"{prefix}{k}": v for k, v in det.metrics(verdict, float(sm), len(vals), cfg).items()}

    def update(self, step: int, metrics: Mapping[str, float]) -> dict[str, float]:
        cfg = self.config
        self.new_events = []
        keys = [REWARD_STD_KEY, *(k for d in DETECTORS.values() if not d.per_bucket for k in d.series)]
        for key in dict.fromkeys(keys):
            if key in metrics and metrics[key] is not None and math.isfinite(float(metrics[key])):
                self._append(key, step, float(metrics[key]))
        for i in range(cfg.num_buckets):
            mean = metrics.get(bucket_key(i, "mean"))
            count = metrics.get(bucket_key(i, "count"), 0.0)
            if mean is not None and math.isfinite(float(mean)) and float(count) >= cfg.bucket_min_count:
                self._append(bucket_key(i, "mean"), step, float(mean))
        out: dict[str, float] = {}
        scale = self.reward_scale()
        for name, det in DETECTORS.items():
            if not det.per_bucket:
                if det.series[0] in self.history:
                    series = {k: self.history[k] for k in det.series if k in self.history}
                    out.update(self._run(step, det.event or name, det, series, "stability/", scale))
                continue
            for i in range(cfg.num_buckets):
                key = bucket_key(i, "mean")
                if key in self.history and self.history[key][0][-1] == step:
                    out.update(self._run(step, f"{det.event or name}/bucket_{i:02d}", det,
                                         {BUCKET_SERIES: self.history[key]}, f"stability/bucket_{i:02d}_", scale))
        return out

    def state_dict(self) -> dict:
        """Everything needed to resume exactly (JSON-serializable)."""
        return {"history": {k: [list(a), list(b)] for k, (a, b) in self.history.items()},
                "states": dict(self.states), "events": list(self.events)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = {k: [list(a), list(b)] for k, (a, b) in state["history"].items()}
        self.states = dict(state["states"])
        self.events = list(state["events"])
        self.new_events = []


def detect_run(records: Sequence[Mapping[str, float]], cfg: StabilityConfig | None = None) -> dict[str, Any]:
    """Offline detectors over a finished (or running) run's per-step records (``metrics.jsonl``).

    Returns one verdict per ``DETECTORS`` entry: ``{"length_collapse": LengthCollapseVerdict,
    "hockey_stick": HockeyStickVerdict, "collapse_warning": WarningVerdict, "hockey_stick_warning":
    WarningVerdict, "buckets": {i: HockeyStickVerdict}}`` (per-bucket ones by bucket).
    """
    cfg = cfg or StabilityConfig()

    def series(key: str, min_count_key: str | None = None) -> tuple[list[int], list[float]]:
        st, vals = [], []
        for r in records:
            val = r.get(key)
            if val is None or "step" not in r or not math.isfinite(float(val)):
                continue
            if min_count_key is not None and float(r.get(min_count_key) or 0) < cfg.bucket_min_count:
                continue
            st.append(int(r["step"]))
            vals.append(float(val))
        return st, vals

    std_vals = series(REWARD_STD_KEY)[1][: cfg.baseline_steps]
    scale = float(np.median(std_vals)) if std_vals else None
    out: dict[str, Any] = {}
    for name, det in DETECTORS.items():
        if not det.per_bucket:
            out[name] = det.detect({k: series(k) for k in det.series}, cfg, scale)
            continue
        out[name] = {}
        for i in range(cfg.num_buckets):
            st, vals = series(bucket_key(i, "mean"), bucket_key(i, "count"))
            if st:
                out[name][i] = det.detect({BUCKET_SERIES: (st, vals)}, cfg, scale)
    return out
