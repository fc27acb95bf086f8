"""Per-step batch metrics, stability detectors and the run logger (pure: no Ray / DeepSpeed / vLLM).

Batch metrics: ``batch_metrics``, ``length_bucket_stats``, ``explained_variance``,
``reduce_update_stats`` (with ``ACTOR_STAT_NAMES`` / ``CRITIC_STAT_NAMES``).
Detectors: ``detect_length_collapse``, ``detect_hockey_stick``, ``detect_run`` (offline) and
``StabilityMonitor`` (online), thresholds and length buckets in ``StabilityConfig``
(``rlhf.metrics.config``, the typed ``metrics:`` config section).
Logging: ``MetricLogger`` (JSONL, TensorBoard, W&B: ``LOGGERS``), ``read_jsonl``.
Pre-flight length-bias check of the first batch: ``preflight_length_bias`` / ``preflight_check``
(metrics), ``preflight_line`` (its sentence), ``preflight_report`` (both; what the trainer calls).

Names are imported lazily (PEP 562), so ``rlhf.metrics.config`` can be imported by the config
tree without importing torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "rlhf.metrics.batch": ["ACTOR_STAT_NAMES", "CRITIC_STAT_NAMES", "batch_metrics", "bucket_key",
                           "explained_variance", "length_bucket_index", "length_bucket_stats",
                           "reduce_update_stats"],
    "rlhf.metrics.config": ["MetricsConfig", "MetricsConfigError", "StabilityConfig"],
    "rlhf.metrics.detectors": ["HOCKEY_CLASS_CODES", "PHASE_CODES", "VERDICT_CODES", "HockeyStickVerdict",
                               "LengthCollapseVerdict", "StabilityMonitor", "detect_hockey_stick",
                               "detect_length_collapse", "detect_run", "rolling_median"],
    "rlhf.metrics.logger": ["LOGGERS", "MetricLogger", "read_jsonl"],
    "rlhf.metrics.preflight": ["preflight_check", "preflight_length_bias", "preflight_line", "preflight_report"],
}
_MODULE_OF = {name: mod for mod, names in _WHERE.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    mod = _MODULE_OF.get(name)
    if mod is None:
        raise AttributeError(f"module 'rlhf.metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
