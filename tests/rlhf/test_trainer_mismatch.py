"""Rollout/trainer mismatch metrics on every step, whatever ``ppo.old_logp_source`` is, and the
masked importance sampling variant (``ppo.mismatch_reject``), in short tiny runs."""

from __future__ import annotations

import json

import pytest
import ray

from rlhf.config import load_config
from rlhf.trainer import train

pytestmark = pytest.mark.slow

BASE = ["trainer.total_steps=2", "trainer.save_every=0", "trainer.probe_every=0", "ppo.rollout_batch_size=8",
        "ppo.mini_batch_size=8"]
KEYS = ("kl/rollout_vs_trainer", "kl/rollout_vs_trainer_k1", "kl/rollout_vs_trainer_max_abs",
        "kl/rollout_vs_trainer_ratio_p01", "kl/rollout_vs_trainer_ratio_p50", "kl/rollout_vs_trainer_ratio_p99")


def _run(tmp_path, name, overrides):
    cfg = load_config(None, [f"run_dir={tmp_path / name}", *BASE, *overrides])
    train(cfg)
    return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_mismatch_metrics_every_step_and_rejection(tmp_path):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # old logprobs from the rollout: a 4-row sample is rescored every step for the metrics
        recs = _run(tmp_path, "rollout_src", ["ppo.old_logp_source=rollout", "ppo.mismatch_sample_rows=4"])
        # fp32: per-sequence k3 is ~1e-15, under any sane threshold: nothing is rejected, training goes on
        rej = _run(tmp_path, "reject", ["ppo.mismatch_reject=1e-6", "ppo.ppo_epochs=1"])
    finally:
        ray.shutdown()
    for r in recs:
        assert all(k in r for k in KEYS), sorted(k for k in KEYS if k not in r)
        assert r["kl/rollout_vs_trainer"] < 1e-3   # fp32: the two engines agree on the same weights
    assert all("kl/rollout_vs_trainer_rejected_frac" in r for r in rej)
    assert [r["kl/rollout_vs_trainer_rejected_frac"] for r in rej] == [0.0, 0.0]
    assert all(r["actor/clipfrac"] >= 0 for r in rej)  # the masked update ran
