"""``perf/mfu*`` of a PPO step on the driver: the models' shapes read once from their
``config.json``, the job's peak measured or looked up once (``rlhf.metrics.perf`` holds the math)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from rlhf.config import PPOConfig


@functools.lru_cache(maxsize=8)
def _shape(path: str, head: str):
    from rlhf.metrics.perf import model_shape

    return model_shape(json.loads((Path(path) / "config.json").read_text()), head)


@functools.lru_cache(maxsize=4)
def _peak(override, gpu_run: bool, bf16: bool):
    from rlhf.engines.accelerator import job_peak_tflops

    return job_peak_tflops(override, gpu_run, bf16)


def step_mfu(cfg: PPOConfig, batch, critic: bool, actor_trains: bool, seconds: dict) -> dict[str, float]:
    """``perf/mfu*`` of one step (``rlhf.metrics.perf``): the models' shapes from their
    ``config.json`` (none when one lacks the decoder fields counted), the batch's real tokens, the peak of
    ``trainer.peak_tflops`` or the start-up probe."""
    from rlhf.metrics.perf import mfu_metrics, step_flops
    from rlhf.workers.group import engine_settings

    from rlhf.trainer import model_paths

    paths = model_paths(cfg, Path(cfg.run_dir))
    resp = float(batch.mask.sum())
    try:
        shapes = (_shape(paths.actor, "lm"), _shape(paths.critic, "score") if critic else None,
                  _shape(cfg.reward.model, "score") if cfg.reward.model else None)
    except (KeyError, OSError, ValueError):  # a config without the decoder fields it counts: no MFU
        return {}
    flops = step_flops(*shapes,
                       float(batch.attention_mask.sum()) - resp, resp, batch.num_rows, cfg.ppo.ppo_epochs,
                       actor_scores=cfg.ppo.old_logp_source == "trainer", actor_trains=actor_trains)
    bf16 = bool(engine_settings(cfg, "actor")[1].bf16)
    return mfu_metrics(flops, seconds, _peak(cfg.trainer.peak_tflops, cfg.cluster.gpus_per_worker > 0, bf16))
