"""The ``metrics:`` section of a PPO config: length buckets and the stability detectors' thresholds.

One typed dataclass, built once from the YAML mapping (``bairlhf.typed_config.build``, valid
ranges in the field types) and passed as is to ``batch_metrics`` (length buckets), the online
``StabilityMonitor``, the offline ``detect_run`` and ``rlhf report`` (bucket labels, thresholds).
Imports only the standard library and ``bairlhf``, so ``rlhf.config`` can hold it as a field
without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Mapping

from bairlhf.errors import UserError
from bairlhf.typed_config import Range, build


class MetricsConfigError(UserError):
    """A bad ``metrics:`` value; the message names the dotted key."""


POS = Range(1, None)
"""An integer count >= 1."""
FRACTION = Range(0, 1, lo_open=True, hi_open=True)
"""A fraction in (0, 1)."""
Action = Literal["log", "checkpoint", "stop", "rollback"]
"""What a detector's verdict does (``rlhf.metrics.actions``)."""
Fallback = Literal["log", "checkpoint", "stop"]
"""What a ``rollback`` switch does when no rollback is possible."""
POSITIVE = Range(0, None, lo_open=True)
"""A number > 0."""


@dataclass
class StabilityConfig:
    """Length buckets and detector thresholds (``metrics:`` section of a PPO config).

    Ranges are checked when the section is built (``from_dict`` / ``build``); a value outside
    one stops the program with an error naming ``metrics.<key>``.
    """

    smooth_window: Annotated[int, POS] = 5
    """Causal rolling-median window in observations (>= 1; 1 = no smoothing)."""
    baseline_steps: Annotated[int, POS] = 3
    """Baseline = median of the first N raw values (>= 1)."""
    persistence: Annotated[int, POS] = 3
    """A threshold crossing counts when it holds for N consecutive observations (>= 1)."""
    early_steps: Annotated[int, Range(0, None)] = 200
    """Onsets (collapse, reward decline) only count within this many steps of the first step (>= 0)."""
    collapse_fraction: Annotated[float, FRACTION] = 0.5
    """Length collapse: smoothed mean length <= this fraction of the baseline (in (0, 1), below
    ``recovery_fraction``)."""
    recovery_fraction: Annotated[float, Range(0, 1, lo_open=True)] = 0.9
    """Length recovery: smoothed mean length back to >= this fraction of the baseline (in (0, 1])."""
    drop_z: Annotated[float, Range(0, None, lo_open=True)] = 0.25
    """Reward decline: drop of at least this many reward standard deviations, z units (> 0)."""
    noise_k: Annotated[float, Range(0, None)] = 4.0
    """...and at least this many times the per-step noise of the reward series (>= 0)."""
    plateau_tol: Annotated[float, Range(0, 0.5, lo_open=True, hi_open=True)] = 0.25
    """Trough plateau: steps whose z is within this fraction of the depth from the minimum; the
    decline is measured between the same fractions from the baseline and from the minimum
    (in (0, 0.5))."""
    plateau_min_steps: Annotated[int, POS] = 5
    """Floor of the plateau bound: a recovered drop whose plateau is shorter than
    max(this, ``v_plateau_ratio`` x decline length) may be a V-shape (>= 1)."""
    v_max_steps: Annotated[int, POS] = 10
    """Floor of the recovery bound: a V-shape reaches half recovery within
    max(this, ``v_recovery_ratio`` x decline length) steps of the trough (>= 1)."""
    v_plateau_ratio: Annotated[float, Range(0, None, lo_open=True)] = 2.0
    """V-shape / hockey-stick boundary, scaled with the decline's own duration: a plateau longer
    than this many decline lengths makes a hockey stick (> 0; a linear V's ratio is ~1)."""
    v_recovery_ratio: Annotated[float, Range(0, None, lo_open=True)] = 2.0
    """...and so does a half recovery slower than this many decline lengths after the trough
    (> 0; a symmetric V's ratio is ~1)."""
    slope_window: Annotated[int, POS] = 50
    """Recovery slope: least-squares fit over this many steps after the trough (>= 1)."""
    bucket_min_count: Annotated[int, Range(0, None)] = 8
    """Per-bucket reward points from fewer responses than this are treated as missing (>= 0)."""
    bucket_width: Annotated[int, POS] = 100
    """Length-bucket width in tokens: bucket i holds lengths in [i w, (i + 1) w) (>= 1)."""
    num_buckets: Annotated[int, Range(1, 100)] = 20
    """Number of length buckets, the last open-ended (1 .. 100: names are ``bucket_00`` .. ``bucket_99``)."""
    preflight_long_tokens: Annotated[int, Range(0, None)] = 0
    """Pre-flight length-bias check: responses over this many tokens count as long (>= 0; 0: over
    the first batch's median length)."""
    warn_bias_corr: Annotated[float, Range(0, 1, hi_open=True)] = 0.2
    """Collapse warning: the smoothed advantage-length (else score-length) correlation must be
    <= -this (in [0, 1))."""
    warn_length_fraction: Annotated[float, FRACTION] = 0.9
    """...and the smoothed mean length <= this fraction of its baseline (in (0, 1))."""
    warn_reward_corr: Annotated[float, Range(0, 1)] = 0.3
    """Collapse warning, second path (no length condition): the reward itself prefers short
    responses, its smoothed score-length correlation ``reward/length_corr`` <= -this, while the
    update follows it (the bias indicator <= -``warn_bias_corr``) (in [0, 1]; 1 turns the path off)."""
    warn_hockey_z: Annotated[float, Range(0, None, lo_open=True)] = 0.125
    """Hockey-stick warning: smoothed reward this many reward stds below its baseline (> 0)."""
    warn_smooth_window: Annotated[int, POS] = 1
    """Collapse warning: rolling-median window of the length series (>= 1; default 1, raw: the
    warning must not lag, the persistence and the bias indicator guard it against noise)."""
    warn_persistence: Annotated[int, POS] = 2
    """A warning is raised once its condition held for this many consecutive observations (>= 1)."""
    on_collapse_warning: Action = "log"
    """What the collapse warning does (``rlhf.metrics.actions``): log, checkpoint, stop, or rollback."""
    on_collapse: Action = "log"
    """What a detected length collapse does: log, checkpoint, stop, or rollback."""
    on_hockey_stick_warning: Action = "log"
    """What the reward-decline warning does: log, checkpoint, stop, or rollback."""
    on_hockey_stick: Action = "log"
    """What a decline classed as a hockey stick does: log, checkpoint, stop, or rollback."""
    rollback_change: Literal["kl", "lr", "merge"] = "kl"
    """What a ``rollback`` changes before training on from the restored checkpoint: ``kl`` (the KL
    coefficient x ``rollback_kl_factor``), ``lr`` (actor and critic learning rates x
    ``rollback_lr_factor``) or ``merge`` (the actor re-initialized as a linear merge of its restored
    weights with the base model at ``rollback_merge_ratio``: an online BAI)."""
    rollback_kl_factor: Annotated[float, POSITIVE] = 2.0
    """``rollback_change: kl``: the KL coefficient is multiplied by this from the rollback on (> 0;
    with ``ppo.kl_target`` the adaptive controller continues from the multiplied value)."""
    rollback_lr_factor: Annotated[float, POSITIVE] = 0.5
    """``rollback_change: lr``: actor and critic learning rates (peak and current) are multiplied
    by this from the rollback on (> 0)."""
    rollback_merge_ratio: Annotated[float, Range(0, 1, lo_open=True)] = 0.5
    """``rollback_change: merge``: the base model's weight in the merge, actor = ratio x base +
    (1 - ratio) x restored actor (in (0, 1]; 1 = restart from the base)."""
    rollback_max: Annotated[int, POS] = 1
    """At most this many rollbacks per run (>= 1); later ones fall back to ``rollback_fallback``."""
    rollback_fallback: Fallback = "log"
    """What a ``rollback`` switch does instead when no rollback is possible (``rollback_max``
    reached, or no checkpoint before the firing step): log, checkpoint, or stop."""

    def __post_init__(self) -> None:
        if not self.collapse_fraction < self.recovery_fraction:
            raise MetricsConfigError(
                f"metrics.collapse_fraction: must be below metrics.recovery_fraction, got "
                f"{self.collapse_fraction} and {self.recovery_fraction}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "metrics") -> "StabilityConfig":
        """Build from a plain mapping; an unknown key, a wrong type or a value out of range raises
        ``MetricsConfigError`` naming ``metrics.<key>``."""
        if isinstance(data, cls):
            return data
        return build(cls, data, where, MetricsConfigError)

    def bucket_label(self, i: int) -> str:
        """``length [20, 30)`` for bucket ``i``; the last bucket is ``length >= lo``."""
        lo = i * self.bucket_width
        if i >= self.num_buckets - 1:
            return f"length >= {lo}"
        return f"length [{lo}, {lo + self.bucket_width})"


MetricsConfig = StabilityConfig
"""The same class under the name of its config section."""
