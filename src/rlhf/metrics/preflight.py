"""Pre-flight length-bias check: what the reward does to length, measured on the first batch.

Before the first PPO update the trainer scores one batch of the initial policy's responses. If
the reward already favours short (or long) responses there, PPO will follow that gradient; a
sequence-length collapse under a length-biased reward model starts here. ``preflight_length_bias``
turns the batch's response lengths and reward scores into ``stability/preflight_*`` metrics:

    stability/preflight_len_score_corr        Pearson correlation of score and length
    stability/preflight_len_score_spearman    Spearman rank correlation (average ranks for ties)
    stability/preflight_long_short_gap_std    (mean score of long - mean score of short) / score std
    stability/preflight_long_short_gap        the same gap in reward units
    stability/preflight_threshold             N: "long" means length > N tokens (the batch median,
                                              or the configured ``metrics.preflight_long_tokens``;
                                              when no length exceeds the median, the longest length
                                              below it, so responses at the cap count as long)
    stability/preflight_long_frac             fraction of the batch that is long
    stability/preflight_bucket_XX_mean        mean score of length bucket XX (non-empty buckets)

A negative gap means the reward scores long responses below short ones. The std is the
population std of the batch's scores. Undefined values (no variation in length or score, an
empty long or short group) are NaN, which the logger writes as ``null``. ``preflight_line``
phrases one record as the sentence the trainer prints and ``rlhf report`` shows. Pure numpy;
no Ray / DeepSpeed / vLLM.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

PREFIX = "stability/preflight_"
CORR = PREFIX + "len_score_corr"
SPEARMAN = PREFIX + "len_score_spearman"
GAP_STD = PREFIX + "long_short_gap_std"
GAP = PREFIX + "long_short_gap"
THRESHOLD = PREFIX + "threshold"
LONG_FRAC = PREFIX + "long_frac"
NUM = PREFIX + "num_responses"


def bucket_mean_key(i: int) -> str:
    """``stability/preflight_bucket_03_mean``: the pre-flight mean score of length bucket ``i``."""
    return f"{PREFIX}bucket_{i:02d}_mean"


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two equal-length vectors; NaN when either does not vary."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return float((dx * dy).sum()) / den if den > 0 else float("nan")


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x``; tied values share the mean of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of the average ranks); NaN when either does not vary."""
    return pearson(average_ranks(x), average_ranks(y))


def preflight_length_bias(lengths: Sequence[float], scores: Sequence[float], *, long_tokens: int = 0,
                          bucket_width: int = 100, num_buckets: int = 20) -> dict[str, float]:
    """The ``stability/preflight_*`` metrics of one batch (see the module docstring).

    Args:
      lengths: [B] response lengths in tokens (generated tokens up to and including EOS).
      scores: [B] reward scores of the same responses (the reward's own scores, before KL shaping).
      long_tokens: "long" means length > this many tokens (>= 1); 0 (default): > the batch median.
      bucket_width, num_buckets: the run's length buckets (``metrics.bucket_width`` /
        ``num_buckets``; bucket i holds [i w, (i + 1) w), the last is open-ended).

    Raises ``ValueError`` for mismatched shapes, an empty batch or non-finite values.
    """
    x = np.asarray(lengths, dtype=np.float64).reshape(-1)
    y = np.asarray(scores, dtype=np.float64).reshape(-1)
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"lengths ({x.size}) and scores ({y.size}) must be one non-empty [B] shape")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("lengths and scores must be finite")
    if long_tokens < 0 or bucket_width < 1 or num_buckets < 1:
        raise ValueError(f"long_tokens >= 0, bucket_width >= 1 and num_buckets >= 1, got "
                         f"{long_tokens}, {bucket_width}, {num_buckets}")
    threshold = float(long_tokens) if long_tokens else float(np.median(x))
    if not long_tokens and not (x > threshold).any():   # the median is the longest length (e.g. most
        below = x[x < threshold]                        # responses hit max_new_tokens): split below it
        threshold = float(below.max()) if below.size else threshold
    long = x > threshold
    std = float(y.std())
    gap = float(y[long].mean() - y[~long].mean()) if long.any() and (~long).any() else float("nan")
    out = {
        NUM: float(x.size),
        CORR: pearson(x, y),
        SPEARMAN: spearman(x, y),
        THRESHOLD: threshold,
        LONG_FRAC: float(long.mean()),
        GAP: gap,
        GAP_STD: gap / std if std > 0 and math.isfinite(gap) else float("nan"),
    }
    idx = np.clip((x // bucket_width).astype(np.int64), 0, num_buckets - 1)
    for i in np.unique(idx).tolist():
        out[bucket_mean_key(i)] = float(y[idx == i].mean())
    return out


def _ok(v) -> bool:
    return v is not None and math.isfinite(float(v))


def preflight_line(m: Mapping[str, float | None]) -> str:
    """One readable sentence for a record holding the pre-flight metrics, e.g. "the reward scores
    responses over 40 tokens 0.85 std below shorter ones (Pearson r = -0.41, Spearman rho = -0.38,
    64 responses)"; "" when the record has none."""
    if CORR not in m and GAP_STD not in m:
        return ""
    n, thr, gap = m.get(NUM), m.get(THRESHOLD), m.get(GAP_STD)
    corr, rho = m.get(CORR), m.get(SPEARMAN)
    tail = (f"(Pearson r = {_num(corr)}, Spearman rho = {_num(rho)}"
            + (f", {int(n)} responses)" if _ok(n) else ")"))
    over = f"over {float(thr):g} tokens" if _ok(thr) else "longer than the median"
    if not _ok(gap):
        return (f"pre-flight length bias: not measurable on the first batch (lengths or scores do not "
                f"vary, or no response is {over}) {tail}")
    gap = float(gap)
    side = "below" if gap < 0 else "above"
    return f"pre-flight length bias: the reward scores responses {over} {abs(gap):.2f} std {side} shorter ones {tail}"


def _num(v) -> str:
    return f"{float(v):.2f}" if _ok(v) else "n/a"


def preflight_check(lengths: Sequence[float], scores: Sequence[float], config) -> dict[str, float]:
    """``preflight_length_bias`` with the run's ``metrics:`` section (``StabilityConfig``): its
    ``preflight_long_tokens``, ``bucket_width`` and ``num_buckets``. What the trainer calls on the
    first batch (the reward's own scores, before clipping, the missing-EOS penalty and KL shaping)."""
    return preflight_length_bias(np.asarray(lengths, dtype=np.float64), np.asarray(scores, dtype=np.float64),
                                 long_tokens=config.preflight_long_tokens, bucket_width=config.bucket_width,
                                 num_buckets=config.num_buckets)


def preflight_report(lengths: Sequence[float], scores: Sequence[float], config, prog: str = "rlhf train") -> dict[str, float]:
    """``preflight_check`` plus its readable line on stderr (``[rlhf train] pre-flight length bias:
    ...``): the one call the trainer makes on its first batch, before the first update."""
    import sys

    out = preflight_check(lengths, scores, config)
    line = f"[{prog}] {preflight_line(out)}"
    try:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)   # on its own line, above the trainer's progress bar
    except ImportError:
        print(line, file=sys.stderr, flush=True)
    return out
