"""The PPO config tree: defaults, dotted overrides, one clear error per bad key."""

from __future__ import annotations

import pytest
import yaml

from rlhf.config import DEFAULT_CONFIG, REPO_ROOT, ConfigError, load_config, save_config


def test_default_config_loads_and_round_trips(tmp_path):
    cfg = load_config()
    assert cfg.model.actor == "tiny" and cfg.reward.function
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg


def test_paper_template_loads():
    cfg = load_config(REPO_ROOT / "configs" / "ppo" / "bai_olmoe_8x8.yaml", check_paths=False)
    assert cfg.ppo.rollout_batch_size == 4096 and cfg.ppo.mini_batch_size == 512
    assert cfg.optim.actor_lr == cfg.optim.critic_lr == 1e-6
    assert cfg.ppo.lam_actor == 0.95 and cfg.ppo.gamma == 1.0
    assert cfg.cluster.actor_workers * cfg.cluster.critic_workers > 1


def test_dotted_overrides_parse_yaml_scalars():
    cfg = load_config(None, ["trainer.total_steps=50", "optim.actor_lr=1e-4", "ppo.dual_clip=3",
                             "reward.function=rlhf.rewards:short_answer", "ppo.kl_target=null"])
    assert cfg.trainer.total_steps == 50 and cfg.optim.actor_lr == 1e-4
    assert cfg.ppo.dual_clip == 3.0 and cfg.reward.function.endswith("short_answer") and cfg.ppo.kl_target is None


@pytest.mark.parametrize("override, key", [
    ("trainer.totl_steps=5", "trainer.totl_steps"),
    ("nonsense=1", "nonsense"),
    ("ppo.clip_low=abc", "ppo.clip_low"),
    ("trainer.total_steps=1.5", "trainer.total_steps"),
    ("ppo.mini_batch_size=5", "ppo.mini_batch_size"),
    ("ppo.micro_batch_size=3", "ppo.micro_batch_size"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("model.critic=/does/not/exist", "model.critic"),
    ("data.path=/does/not/exist.jsonl", "data.path"),
    ("reward.model=/does/not/exist", "reward"),
    ("ppo.kl_kind=k9", "ppo.kl_kind"),
    ("metrics.smoth_window=3", "metrics.smoth_window"),
    ("metrics.smooth_window=abc", "metrics.smooth_window"),
    ("metrics.smooth_window=0", "metrics.smooth_window"),
    ("rollout.num_engines=0", "rollout.num_engines"),
    ("rollout.num_engines=2", "rollout.num_engines"),
    ("rollout.weight_sync=nccl", "rollout.weight_sync"),
    ("rollout.weight_sync=broadcast", "rollout.weight_sync"),
    ("ppo.old_logp_source=sampler", "ppo.old_logp_source"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(key), str(e.value)


def test_unknown_key_in_file_is_named(tmp_path):
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data["ppo"]["gae_lambda"] = 0.9
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"^ppo.gae_lambda: unknown key"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config: file does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_rollout_engines_and_weight_sync_mode():
    from rlhf.config import weight_sync_mode
    from rlhf.workers.group import vllm_overrides

    cfg = load_config(None, ["rollout.engine=vllm", "rollout.num_engines=4", "metrics.drop_z=0.5"])
    assert vllm_overrides(cfg) == {"num_engines": 4, "tensor_parallel_size": 1, "seed": 0}
    assert weight_sync_mode(cfg) == "reload"  # colocated: in-process reload
    assert weight_sync_mode(load_config(None, ["rollout.engine=vllm", "cluster.colocate=false"])) == "broadcast"
    assert weight_sync_mode(load_config(None, ["cluster.colocate=false"])) == "reload"  # hf: reload only
    with pytest.raises(ConfigError, match="^rollout.tensor_parallel_size: tensor parallelism needs GPUs"):
        load_config(None, ["rollout.engine=vllm", "rollout.tensor_parallel_size=2"])
    cfg = load_config(None, ["rollout.engine=vllm", "rollout.tensor_parallel_size=2", "cluster.gpus_per_worker=1"])
    assert vllm_overrides(cfg)["tensor_parallel_size"] == 2


def test_old_logp_source_rollout_refuses_filtering_and_tis():
    assert load_config(None, ["ppo.old_logp_source=rollout"]).ppo.old_logp_source == "rollout"
    assert load_config(None, []).ppo.old_logp_source == "trainer"
    for extra in ["rollout.top_k=5", "rollout.top_p=0.9", "ppo.tis_cap=2.0"]:
        with pytest.raises(ConfigError, match=r"^ppo\.old_logp_source"):
            load_config(None, ["ppo.old_logp_source=rollout", extra])
