"""Per-step batch metrics, stability detectors and the run logger (pure: no Ray / DeepSpeed / vLLM).

Batch metrics: ``batch_metrics``, ``length_bucket_stats``, ``explained_variance``,
``reduce_update_stats`` (with ``ACTOR_STAT_NAMES`` / ``CRITIC_STAT_NAMES``).
Detectors: ``detect_length_collapse``, ``detect_hockey_stick``, ``detect_run`` (offline) and
``StabilityMonitor`` (online), thresholds in ``StabilityConfig``.
Logging: ``MetricLogger`` (JSONL + TensorBoard), ``read_jsonl``.
"""

from rlhf.metrics.batch import (ACTOR_STAT_NAMES, CRITIC_STAT_NAMES, batch_metrics, bucket_key, explained_variance,
                                length_bucket_index, length_bucket_stats, reduce_update_stats)
from rlhf.metrics.detectors import (HOCKEY_CLASS_CODES, PHASE_CODES, VERDICT_CODES, HockeyStickVerdict,
                                    LengthCollapseVerdict, StabilityConfig, StabilityMonitor, detect_hockey_stick,
                                    detect_length_collapse, detect_run, rolling_median)
from rlhf.metrics.logger import MetricLogger, read_jsonl

__all__ = [
    "ACTOR_STAT_NAMES", "CRITIC_STAT_NAMES", "HOCKEY_CLASS_CODES", "PHASE_CODES", "VERDICT_CODES",
    "HockeyStickVerdict", "LengthCollapseVerdict", "MetricLogger", "StabilityConfig", "StabilityMonitor",
    "batch_metrics", "bucket_key", "detect_hockey_stick", "detect_length_collapse", "detect_run",
    "explained_variance", "length_bucket_index", "length_bucket_stats", "read_jsonl", "reduce_update_stats",
    "rolling_median",
]
