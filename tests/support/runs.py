"""Test support: one in-process ``rlhf train`` run on a fresh local Ray, its metrics read back."""

from __future__ import annotations

import json
from pathlib import Path


def run_train(cfg, num_cpus: int = 4) -> list[dict]:
    """Start a local Ray (``num_cpus`` CPUs, no dashboard), run ``rlhf.trainer.train(cfg)``, shut
    Ray down (also on failure) and return the records of ``<cfg.run_dir>/metrics.jsonl``, one per step."""
    import ray

    from rlhf.trainer import train

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        train(cfg)
    finally:
        ray.shutdown()
    return [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
