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
    _assert_refused(override, key)


def _assert_refused(override: str, start: str) -> None:
    """``load_config`` with one bad override raises a ``ConfigError`` whose message starts with ``start``."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(start), str(e.value)


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


def test_every_numeric_field_has_a_documented_range():
    """Issue 12 point 2: a new numeric field of the PPO config (or of sft / rm) cannot skip its range."""
    from rlhf.config import PPOConfig, numeric_fields
    from rlhf.rm import RMConfig
    from rlhf.sft import SFTConfig

    for cls in (PPOConfig, SFTConfig, RMConfig):
        fields = numeric_fields(cls)
        assert len(fields) >= 10
        missing = [key for key, _, r, _ in fields if r is None]
        assert not missing, f"{cls.__name__}: numeric fields without an Annotated[..., Range(...)]: {missing}"
        undocumented = [key for key, _, _, doc in fields if not doc]
        assert not undocumented, f"{cls.__name__}: numeric fields without a docstring: {undocumented}"
    keys = {k: r for k, _, r, _ in numeric_fields(PPOConfig)}
    assert keys["ppo.gamma"] == "[0, 1]" and keys["optim.actor_lr"] == "(0, 1]" and keys["optim.betas"] == "each [0, 1)"


def test_config_ranges_doc_is_current():
    from rlhf.config import ranges_markdown

    doc = REPO_ROOT / "docs" / "config_ranges.md"
    assert doc.read_text() == ranges_markdown(), "regenerate docs/config_ranges.md (see its first paragraph)"


@pytest.mark.parametrize("override, message", [
    ("ppo.gamma=-1", "ppo.gamma: must be in [0, 1], got -1.0"),
    ("ppo.lam_actor=2", "ppo.lam_actor: must be in [0, 1], got 2.0"),
    ("ppo.kl_coef=-5", "ppo.kl_coef: must be >= 0, got -5.0"),
    ("reward.clip=-1", "reward.clip: must be > 0, got -1.0"),
    ("data.max_prompt_tokens=0", "data.max_prompt_tokens: must be >= 1, got 0"),
    ("rollout.top_k=-3", "rollout.top_k: must be >= 0, got -3"),
    ("optim.actor_lr=-1e-6", "optim.actor_lr: must be in (0, 1], got -1e-06"),
    ("optim.critic_lr=.nan", "optim.critic_lr: must be a finite number"),
    ("ppo.mini_batch_size=[8", "ppo.mini_batch_size: cannot parse override value '[8'"),
    ("data.path=builtin:foo", "data.path: unknown built-in prompt set 'builtin:foo' (known: builtin:arith)"),
])
def test_issue12_examples_are_refused(override, message):
    _assert_refused(override, message)


def test_engine_choice_and_megatron_sections():
    cfg = load_config(None, [])
    assert (cfg.engine.actor, cfg.engine.critic) == ("deepspeed", "deepspeed")
    assert (cfg.megatron.tensor_parallel, cfg.megatron.pipeline_parallel, cfg.megatron.distributed_optimizer,
            cfg.megatron.recompute, cfg.megatron.bf16) == (1, 1, True, False, False)
    from rlhf.config import role_parallel

    cfg = load_config(None, ["engine.actor=megatron", "megatron.tensor_parallel=2", "cluster.actor_workers=2",
                             "ppo.micro_batch_size=4"])
    assert role_parallel(cfg, "actor") == (2, 1, 1) and role_parallel(cfg, "critic") == (1, 1, 1)
    with pytest.raises(ConfigError, match=r"^megatron.tensor_parallel: .* does not divide cluster.actor_workers 1"):
        load_config(None, ["engine.actor=megatron", "megatron.tensor_parallel=2"])
    # with TP 2 on 4 ranks there are 2 data-parallel ranks: mini 8 = micro 4 x 2
    load_config(None, ["engine.critic=megatron", "megatron.tensor_parallel=2", "cluster.critic_workers=4",
                       "ppo.micro_batch_size=4"])
    with pytest.raises(ConfigError, match=r"^ppo.micro_batch_size: .* x 2 data-parallel critic ranks"):
        load_config(None, ["engine.critic=megatron", "megatron.pipeline_parallel=2", "cluster.critic_workers=4",
                           "ppo.micro_batch_size=8"])
    mg = load_config(REPO_ROOT / "configs" / "ppo" / "bai_olmoe_8x8_megatron.yaml", check_paths=False)
    assert (mg.engine.actor, mg.engine.critic, mg.megatron.tensor_parallel, mg.megatron.pipeline_parallel) == \
        ("megatron", "megatron", 4, 2)
    assert role_parallel(mg, "actor") == (4, 2, 8)


def test_prompts_are_checked_at_load(tmp_path):
    import json

    from rlhf.data import check_prompts, load_prompts

    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "a"}) + "\n\n" + json.dumps({"prompt": [{"role": "user", "content": "b"}]})
                    + "\n")
    cfg = load_config(None, [f"data.path={good}"])
    assert check_prompts(cfg.data) == 2 and load_prompts(str(good)) == ["a", [{"role": "user", "content": "b"}]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: record has no 'prompt' field"):
        load_config(None, [f"data.path={bad}"])
    assert load_config(None, [f"data.path={bad}"], check_paths=False).data.path == str(bad)  # rlhf plan: no reads
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["x", "y"]}), tmp_path / "p.parquet")
    with pytest.raises(ConfigError, match=r"^data.prompt_key: column 'prompt' not in"):
        load_config(None, [f"data.path={tmp_path / 'p.parquet'}"])
    assert check_prompts(load_config(None, [f"data.path={tmp_path / 'p.parquet'}", "data.prompt_key=question"]).data) == 2


def test_advantage_estimator_choices_match_the_registry():
    import dataclasses
    import typing

    from rlhf.algo.estimators import ESTIMATORS
    from rlhf.config import PPOSettings

    hints = typing.get_type_hints(PPOSettings)
    assert typing.get_args(hints["advantage_estimator"]) == tuple(ESTIMATORS)
    assert {f.name: f.default for f in dataclasses.fields(PPOSettings)}["advantage_estimator"] == "gae"
    cfg = load_config(None, ["ppo.advantage_estimator=grpo", "ppo.n_samples_per_prompt=4", "ppo.grpo_eps=1e-4"])
    assert cfg.ppo.advantage_estimator == "grpo" and cfg.ppo.grpo_eps == 1e-4
    load_config(None, ["ppo.advantage_estimator=reinforce_pp"])  # no groups needed


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_refuse_one_sample_per_prompt(name):
    with pytest.raises(ConfigError, match=r"^ppo\.n_samples_per_prompt: is 1; .*needs >= 2"):
        load_config(None, [f"ppo.advantage_estimator={name}", "ppo.n_samples_per_prompt=1"])


@pytest.mark.parametrize("override, key", [(["ppo.advantage_estimator=ppo"], "ppo.advantage_estimator"),
                                           (["ppo.grpo_eps=0"], "ppo.grpo_eps"),
                                           (["ppo.advantage_estimator=rloo", "ppo.n_samples_per_prompt=2",
                                             "ppo.critic_warmup_steps=2"], "ppo.critic_warmup_steps")])
def test_bad_estimator_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', r'[.]')}"):
        load_config(None, override)


@pytest.mark.parametrize("overrides,key", [
    (["ppo.max_tokens_per_micro_batch=0"], "ppo.max_tokens_per_micro_batch"),
    (["ppo.max_tokens_per_micro_batch=512", "engine.actor=megatron"], "ppo.max_tokens_per_micro_batch"),
    (["trainer.peak_tflops=0"], "trainer.peak_tflops"),
    (["trainer.peak_tflops=-3"], "trainer.peak_tflops"),
])
def test_budget_and_peak_keys_are_checked(overrides, key):
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.")):
        load_config(None, overrides)
