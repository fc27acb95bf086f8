"""Early warnings of a length collapse and of a reward hockey stick, from leading indicators.

Both are ``DETECTORS`` entries (``rlhf.metrics.detectors``): pure functions over the metric
history, run by the online monitor after every step, so the warning at step t uses only steps
<= t (the step a warning is *raised* is the step it becomes known online, not the start of the
stretch that proved it).

Collapse warning (``stability/collapse_warning``: 0 quiet, 1 warned): raised at the first step
where, for ``warn_persistence`` consecutive observations,
  - the update prefers short responses: the rolling median (``smooth_window``) of the batch's
    correlation of each response's mean advantage with its length (``advantage/length_corr``;
    without advantages, the score-length correlation ``reward/length_corr``) is <=
    -``warn_bias_corr``, and
  - the length has started to move: the rolling median (``warn_smooth_window``, shorter: it
    must not lag) of ``rollout/length_mean`` is <= ``warn_length_fraction`` x its baseline (median of the first ``baseline_steps`` values),
within ``early_steps`` of the first step; or, before the length moves, for ``warn_persistence``
consecutive observations
  - the reward itself prefers short responses: the rolling median (``smooth_window``) of the
    score-length correlation ``reward/length_corr`` is <= -``warn_reward_corr``, and the update
    follows it (the bias indicator above <= -``warn_bias_corr``).
A length drift under an unbiased reward raises nothing, nor does an update that prefers short
responses under a reward with no more than a weak preference, while the lengths hold still. The
second path warns from the first steps of a run whose reward model scores short answers far above
long ones (the organism's collapse runs: ``docs/testbed.md``), where the length can halve within
five steps; with ``warn_reward_corr`` 1 only the first path remains. The lead
time it is evaluated by (``docs/testbed.md``) = the first step whose raw mean length is below
half the baseline minus the warning's step.

Hockey-stick warning (``stability/hockey_stick_warning``): the reward's rolling median has
fallen ``warn_hockey_z`` reward stds below its baseline (a fraction of the decline detector's
``drop_z``, and at least ``noise_k / 2`` times the series' step noise) for ``warn_persistence``
consecutive observations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from rlhf.metrics.config import StabilityConfig

LENGTH_CORR_KEY = "reward/length_corr"
ADV_CORR_KEY = "advantage/length_corr"
BIAS_KEYS = (ADV_CORR_KEY, LENGTH_CORR_KEY)
"""The bias indicator, first found: the correlation of each response's mean advantage with its
length (the direction the update pushes), else the score-length correlation."""

Series = Mapping[str, tuple[Sequence[int], Sequence[float]]]


@dataclass
class WarningVerdict:
    """An early warning on one run."""

    state: str = "quiet"
    """``quiet`` or ``warned`` (latched: a warning stays raised)."""
    step: int | None = None
    """Step at which the warning was raised (known online at that step)."""
    indicator: float | None = None
    """The leading indicator at that step (smoothed correlation, or reward z)."""
    length_ratio: float | None = None
    """Smoothed mean length / baseline at that step (collapse warning)."""


def _smoothed(steps: Sequence[int], values: Sequence[float], window: int) -> tuple[np.ndarray, np.ndarray]:
    from rlhf.metrics.detectors import _as_series, rolling_median

    s, v = _as_series(steps, values)
    return s, rolling_median(v, window)


def _raised(cond: np.ndarray, m: int) -> int | None:
    """First index i with cond[i - m + 1 : i + 1] all true (the step the stretch becomes known)."""
    run = 0
    for i, c in enumerate(cond):
        run = run + 1 if c else 0
        if run >= m:
            return i
    return None


def collapse_warning(series: Series, cfg: StabilityConfig | None = None) -> WarningVerdict:
    """The collapse warning over ``series`` (metric key -> (steps, values)); see the module doc."""
    from rlhf.metrics.detectors import LENGTH_KEY, _as_series

    cfg = cfg or StabilityConfig()
    bias = next((k for k in BIAS_KEYS if k in series and len(series[k][0])), None)
    if LENGTH_KEY not in series or bias is None:
        return WarningVerdict()
    ls, lv = _as_series(*series[LENGTH_KEY])
    if ls.size == 0:
        return WarningVerdict()
    # the baseline needs its first steps; the reward-preference path does not
    base = float(np.median(lv[: cfg.baseline_steps])) if ls.size >= cfg.baseline_steps else math.nan
    _, lsm = _smoothed(ls, lv, cfg.warn_smooth_window)
    cs, csm = _smoothed(*series[bias], cfg.smooth_window)
    corr_at = dict(zip(cs.tolist(), csm.tolist()))
    corr = np.array([corr_at.get(int(s), math.nan) for s in ls])
    early = (ls - ls[0]) <= cfg.early_steps
    i = None
    if base > 0:  # False for nan: too few steps for a baseline yet
        with np.errstate(invalid="ignore"):
            cond = (lsm <= cfg.warn_length_fraction * base) & (corr <= -cfg.warn_bias_corr) & early
        cond[: cfg.baseline_steps] = False
        i = _raised(cond, cfg.warn_persistence)
    if cfg.warn_reward_corr < 1 and LENGTH_CORR_KEY in series and len(series[LENGTH_CORR_KEY][0]):  # the reward's own preference
        rs, rsm = _smoothed(*series[LENGTH_CORR_KEY], cfg.smooth_window)
        r_at = dict(zip(rs.tolist(), rsm.tolist()))
        rcorr = np.array([r_at.get(int(s), math.nan) for s in ls])
        with np.errstate(invalid="ignore"):
            prefers_short = (rcorr <= -cfg.warn_reward_corr) & (corr <= -cfg.warn_bias_corr) & early
        j = _raised(prefers_short, cfg.warn_persistence)
        if j is not None and (i is None or j < i):
            i = j
    if i is None:
        return WarningVerdict()
    # the length ratio once the baseline is known at that step (as online), else None
    ratio = float(lsm[i] / base) if base > 0 and i >= cfg.baseline_steps - 1 else None
    return WarningVerdict("warned", int(ls[i]), float(corr[i]), ratio)


def hockey_stick_warning(series: Series, cfg: StabilityConfig | None = None,
                         scale: float | None = None) -> WarningVerdict:
    """The hockey-stick warning on ``series["reward/mean"]``; ``scale`` = reward std at the start."""
    from rlhf.metrics.detectors import REWARD_KEY, _as_series, reward_z

    cfg = cfg or StabilityConfig()
    if REWARD_KEY not in series:
        return WarningVerdict()
    s, v = _as_series(*series[REWARD_KEY])
    if s.size < cfg.baseline_steps:
        return WarningVerdict()
    _, noise, unit, _, z = reward_z(v, cfg, scale)
    thr = max(cfg.warn_hockey_z, 0.5 * cfg.noise_k * noise / unit)
    cond = (z <= -thr) & ((s - s[0]) <= cfg.early_steps)
    cond[: cfg.baseline_steps] = False
    i = _raised(cond, cfg.warn_persistence)
    if i is None:
        return WarningVerdict()
    return WarningVerdict("warned", int(s[i]), float(z[i]), None)


def lead_time(steps: Sequence[int], lengths: Sequence[float], warning_step: int | None,
              cfg: StabilityConfig | None = None) -> int | None:
    """Steps from the warning to the first step whose raw mean length is below half its baseline
    (None when either never happens)."""
    cfg = cfg or StabilityConfig()
    s, v = np.asarray(steps), np.asarray(lengths, dtype=np.float64)
    if warning_step is None or s.size < cfg.baseline_steps:
        return None
    base = float(np.median(v[: cfg.baseline_steps]))
    below = np.flatnonzero(v < 0.5 * base)
    return None if below.size == 0 else int(s[below[0]]) - int(warning_step)
