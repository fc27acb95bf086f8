"""The testbed's PPO configs are valid `rlhf train` configs (paths are checked at run time)."""

from pathlib import Path

import pytest

from rlhf.config import load_config

CONFIGS = sorted(p for p in (Path(__file__).parents[2] / "configs" / "testbed").glob("*.yaml")
                 if p.name != "bai_sweep.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path):
    cfg = load_config(path, check_paths=False)
    assert cfg.reward.metrics == "rlhf.testbed.rewards:gold"
    assert cfg.model.critic.endswith("/models/rm")  # critic initialized from the reward model
    assert cfg.ppo.lam_actor == 0.95 and cfg.ppo.gamma == 1.0
    # 64 responses per step: 64 prompts, or 16 prompts x 4 samples for the group estimator (GRPO)
    assert cfg.ppo.rollout_batch_size * cfg.ppo.n_samples_per_prompt == 64
