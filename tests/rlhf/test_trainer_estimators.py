"""`rlhf train` with the critic-free advantage estimators (``ppo.advantage_estimator``): no critic
worker, no critic metrics or checkpoint files, and a resume that works without them; plus the
driver's ``step_advantages`` against the calls the trainer made before the registry."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf.algo import gae, masked_whiten, token_rewards
from rlhf.algo.driver import step_advantages
from rlhf.algo.estimators import AdvantageInputs, compute_advantages
from rlhf.config import load_config
from rlhf.trainer import train
from rlhf.workers.batch import make_plans

COMMON = ["trainer.save_every=4", "trainer.probe_every=0", "data.num_builtin=64"]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _batch(B=8, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    logp, ref = (-torch.rand(B, T, generator=g) * mask for _ in range(2))
    return torch.randn(B, generator=g), logp, ref, torch.randn(B, T, generator=g) * mask, mask


def test_gae_path_equals_the_previous_calls_bitwise():
    scores, logp, ref, values, mask = _batch()
    for whiten in (True, False):
        a = step_advantages("gae", scores, logp, ref, values, mask, kl_coef=0.05, kl_kind="k3", gamma=0.99,
                            lam_actor=0.9, lam_critic=1.0, whiten=whiten)
        rewards, kl = token_rewards(scores, logp, ref, mask, 0.05, "k3")
        adv, _ = gae(rewards, values, mask, 0.99, 0.9)
        _, returns = gae(rewards, values, mask, 0.99, 1.0)
        assert torch.equal(a.rewards, rewards) and torch.equal(a.kl, kl)
        assert torch.equal(a.advantages, adv) and torch.equal(a.returns, returns)
        assert torch.equal(a.train, masked_whiten(adv, mask) if whiten else adv)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_critic_free_paths_use_the_registry_on_kl_shaped_rewards(name):
    scores, logp, ref, _, mask = _batch()
    a = step_advantages(name, scores, logp, ref, None, mask, kl_coef=0.1, whiten=True, n_samples_per_prompt=4,
                        eps=1e-6)
    rewards, _ = token_rewards(scores, logp, ref, mask, 0.1, "k1")
    want = compute_advantages(name, AdvantageInputs(mask=mask, scores=rewards.sum(1), token_rewards=rewards,
                                                    n_samples_per_prompt=4, gamma=1.0, eps=1e-6)).advantages
    assert a.returns is None and a.whitened is None  # no trainer whitening on top
    assert torch.equal(a.train, want)


def test_token_sum_norm_plans_divide_by_rows_times_budget():
    cfg = load_config(None, ["rollout.max_new_tokens=12", "ppo.mini_batch_size=8"])
    mask = torch.ones(16, 5)
    mean = make_plans(cfg, 0, mask, 1)
    norm = make_plans(cfg, 0, mask, 1, "token_sum_norm")
    assert [n for _, n in mean[0][0]] == [40.0, 40.0]
    assert [n for _, n in norm[0][0]] == [96.0, 96.0]
    assert [r for r, _ in mean[0][0]] == [r for r, _ in norm[0][0]]


def _check_critic_free(run_dir, steps):
    recs = _records(run_dir)
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    assert not [k for r in recs for k in r if k.startswith("critic/")]
    for r in recs:
        for k in ("reward/mean", "actor/pg_loss", "actor/grad_norm", "actor/entropy"):
            assert math.isfinite(r[k]), (r["step"], k, r[k])
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert ckpts
    for c in ckpts:
        assert (c / "actor").is_dir() and (c / "actor_state").is_dir()
        assert not (c / "critic").exists() and not (c / "critic_state").exists()
    return recs


@pytest.mark.slow
def test_grpo_run_trains_without_a_critic_and_resumes(ray_address, tmp_path):
    import ray

    run_dir = tmp_path / "grpo"
    over = COMMON + [f"run_dir={run_dir}", "ppo.advantage_estimator=grpo", "ppo.rollout_batch_size=4",
                     "ppo.n_samples_per_prompt=4"]
    train(load_config(None, over + ["trainer.total_steps=8"]))
    # every actor this test's job created, dead ones included (the GCS table; no dashboard runs)
    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    names = {a["ActorClassName"] for a in ray._private.state.actors(job_id=job).values()}
    assert "ActorWorker" in names and "CriticWorker" not in names, names
    train(load_config(None, over + ["trainer.total_steps=12"]), resume=True)  # restores the step-8 checkpoint
    recs = _check_critic_free(run_dir, 12)
    first = sum(r["reward/mean"] for r in recs[:4]) / 4
    last = sum(r["reward/mean"] for r in recs[-4:]) / 4
    assert last > first, (first, last)


@pytest.mark.slow
def test_rloo_short_run(ray_address, tmp_path):
    run_dir = tmp_path / "rloo"
    train(load_config(None, COMMON + [f"run_dir={run_dir}", "ppo.advantage_estimator=rloo", "ppo.rollout_batch_size=8",
                                      "ppo.n_samples_per_prompt=2", "trainer.total_steps=4"]))
    _check_critic_free(run_dir, 4)
