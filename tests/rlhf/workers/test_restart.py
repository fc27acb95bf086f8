"""A Ray worker that dies mid-run makes the trainer restart every worker from the last checkpoint.

The same run covers the multi-rank path (2 actor and 2 critic ranks under ZeRO-3 with gloo,
roles in separate placement groups) and BAI init (the actor comes from a merge recipe that the
trainer runs first and records in the run directory).
"""

from __future__ import annotations

import json
import os

import pytest

from rlhf.config import load_config
from rlhf_faults import CRASH_MARKER
from rlhf.trainer import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from rlhf.workers.group import init_ray

    init_ray(None, num_cpus=8)
    yield
    ray.shutdown()


def test_worker_death_restarts_from_checkpoint_zero3_bai_init(ray_cluster, tmp_path, capfd, tiny_family):
    import yaml

    run_dir = tmp_path / "run"
    recipe = tmp_path / "bai.yaml"
    recipe.write_text(yaml.safe_dump({"method": "bai", "base": str(tiny_family["base"]), "alpha": 0.5,
                                      "sft_models": [{"path": str(tiny_family["sft_a"]), "weight": 0.5},
                                                     {"path": str(tiny_family["sft_b"]), "weight": 0.5}]}))
    with open(CRASH_MARKER, "w") as f:
        f.write("5")  # the reward worker dies on its 5th call (step 5); last checkpoint: step 4
    try:
        cfg = load_config(None, [f"run_dir={run_dir}", f"model.bai_recipe={recipe}", "trainer.total_steps=6", "trainer.save_every=2",
                                 "trainer.probe_every=0", "reward.function=rlhf_faults:crash_once",
                                 "deepspeed.zero_stage=3", "cluster.actor_workers=2", "cluster.critic_workers=2",
                                 "cluster.colocate=false", "ppo.micro_batch_size=2", "ppo.mini_batch_size=8"])
        train(cfg)
    finally:
        if os.path.exists(CRASH_MARKER):
            os.remove(CRASH_MARKER)
            pytest.fail("the reward worker never crashed")
    assert "restart 1/2 from the last checkpoint" in capfd.readouterr().err
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000006"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(run_dir / "checkpoints" / "step_000006" / "actor"))
    assert yaml.safe_load((run_dir / "bai_recipe.yaml").read_text())["alpha"] == 0.5  # the run records its recipe
    assert (run_dir / "models" / "bai_actor" / "bai_merge.yaml").exists()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["bai_recipe"] == str(recipe)


def test_non_finite_reward_stops_and_keeps_the_last_checkpoint(ray_cluster, tmp_path):
    from rlhf.trainer import RunStopped

    run_dir = tmp_path / "run"
    # also the ppo.old_logp_source=rollout path: the actor rescores every row at step 0 (the rollout
    # check), a sampled subset later (what the subset logs is the trainer's mismatch section, tested there)
    cfg = load_config(None, [f"run_dir={run_dir}", "trainer.total_steps=4", "trainer.save_every=2",
                             "trainer.probe_every=0", "reward.function=rlhf_faults:nan_reward",
                             "ppo.old_logp_source=rollout"])
    with pytest.raises(RunStopped, match=r"non-finite reward scores at step 3.*step_000002.*is kept"):
        train(cfg)
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    assert "kl/rollout_vs_trainer" in recs[0] and "rollout/entropy" in recs[0]
    assert all("actor/entropy" in r and "kl/to_reference" in r for r in recs)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert (run_dir / "checkpoints" / "step_000002" / "actor" / "model.safetensors").exists()


def test_failed_rollout_check_at_step_zero_stops_with_a_clear_error(ray_cluster, tmp_path):
    from rlhf.trainer import RunStopped

    run_dir = tmp_path / "run"
    # the smallest tolerance the config allows (> 0) fails on any measured mismatch, and bf16 rollouts
    # (KV-cache generation) never match a bf16 full forward bit for bit: the failure path
    cfg = load_config(None, [f"run_dir={run_dir}", "trainer.total_steps=2", "trainer.probe_every=0",
                             "trainer.rollout_check_tol=1e-300", "deepspeed.bf16=true",
                             "ppo.old_logp_source=rollout"])  # checked there too
    with pytest.raises(RunStopped, match=r"kl/rollout_vs_trainer = .* at step 0 exceeds trainer.rollout_check_tol"):
        train(cfg)
    assert not (run_dir / "checkpoints").exists()


def test_worker_constructor_error_is_reported_not_retried(ray_cluster, tmp_path, monkeypatch, capfd):
    """A module the driver can import but the workers cannot (put on sys.path after Ray started):
    the reward worker's constructor fails; the run stops at once with the worker's own message."""
    from rlhf.trainer import RunStopped

    mods = tmp_path / "late"
    mods.mkdir()
    (mods / "late_reward.py").write_text("def score(p, r, f):\n    return [0.0] * len(r)\n")
    monkeypatch.syspath_prepend(str(mods))
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "trainer.total_steps=2", "reward.function=late_reward:score"])
    with pytest.raises(RunStopped, match=r"the reward worker failed to start: .*reward.function: cannot load "
                                         r"'late_reward:score': ModuleNotFoundError"):
        train(cfg)
    assert "restart" not in capfd.readouterr().err  # not retried as a worker death


def test_placement_that_cannot_fit_names_the_cpus(ray_cluster, tmp_path):
    from rlhf.placement import PlacementError

    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "cluster.cpus_per_worker=4"])
    with pytest.raises(PlacementError, match=r"needs 20 CPUs \(a CPU-only run\), the Ray cluster has 8"):
        train(cfg)
    assert not (tmp_path / "run").exists()
