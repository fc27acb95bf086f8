"""`rlhf plan`: the paper's MoE on 8 x 8 80 GB GPUs, failure cases, and the tiny CPU run measured."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from rlhf import cli
from rlhf import plan as P
from rlhf.cli import plan as plan_cli
from rlhf.placement import PlacementError, RoleGroup

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "configs" / "plan" / "paper_moe_8x8.yaml"
PPO_8X8 = ROOT / "configs" / "ppo" / "bai_olmoe_8x8.yaml"
PPO_8X8_MEGATRON = ROOT / "configs" / "ppo" / "bai_olmoe_8x8_megatron.yaml"


def test_paper_moe_fits_on_8x8_80gb():
    inp = P.load_plan_input(PAPER)
    assert inp.model.total_params_b == 25 and inp.model.active_params_b == 2.5
    res = P.plan(inp)
    assert res.fits, res.problems
    actor = next(m for m in res.per_gpu["node0/gpu0"] if m.role == "actor")
    # ZeRO-3 over 64 GPUs: AdamW states 12 bytes x 25e9 / 64
    assert actor.optimizer == pytest.approx(12 * 25e9 / 64)
    assert actor.grads == pytest.approx(2 * 25e9 / 64)
    assert res.vllm["engines"] == 32 and res.vllm["concurrency"] >= 1
    assert max(res.peak_gb.values()) <= res.usable_gb
    st = res.step_time_s
    assert st["total"] == pytest.approx(st["decode"] + st["prefill"] + st["train"] + st["sync"])
    assert 0 < st["train"] < st["total"]


def test_paper_moe_does_not_fit_without_sharding():
    inp = P.load_plan_input(PAPER)
    inp.placement.zero_stage = 0  # 16 bytes x 25e9 params on every GPU
    res = P.plan(inp)
    assert not res.fits and "training phase needs" in res.problems[0]
    inp = P.load_plan_input(PAPER)
    inp.placement.vllm_tp = 1  # 50 GB of vLLM weights in 0.6 x 72 GB: no room for KV
    res = P.plan(inp)
    assert not res.fits and any("leave no KV cache" in p for p in res.problems)


def test_split_placement_and_time_scaling():
    inp = P.load_plan_input(PAPER)
    inp.placement.groups = [RoleGroup(["actor", "reference"], 24), RoleGroup(["critic", "reward"], 24),
                            RoleGroup(["rollout"], 16)]
    res = P.plan(inp)
    assert set(res.per_gpu) == {"node0/gpu0", "node3/gpu0", "node6/gpu0"}
    assert res.vllm["engines"] == 8
    fast = P.plan(dataclasses.replace(inp, gpu=dataclasses.replace(inp.gpu, bf16_tflops=2 * inp.gpu.bf16_tflops)))
    assert fast.step_time_s["train"] == pytest.approx(res.step_time_s["train"] / 2)
    assert res.step_time_s["sync"] > 0.1  # placed apart: weights cross the inter-node link


def test_training_state_matches_measured_tiny_run(tiny_llama):
    """Weights + grads + AdamW states of the tiny CPU actor, measured after one real step."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(ids, labels=ids).loss.backward()
    opt.step()
    params = [p for p in model.parameters()]
    measured_w = sum(p.numel() * p.element_size() for p in params)
    measured_g = sum(p.grad.numel() * p.grad.element_size() for p in params)
    measured_o = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                     if torch.is_tensor(t) and t.dim() > 0)
    n = sum(p.numel() for p in params)
    w, g, o = P.training_state_bytes(n, "fp32", zero_stage=0, n=1)
    assert (w, g, o) == (measured_w, measured_g, measured_o)
    w2, g2, o2 = P.training_state_bytes(n, "fp32", zero_stage=2, n=2)
    assert (w2, g2, o2) == (measured_w, measured_g / 2, measured_o / 2)


def test_cli(tmp_path, capsys):
    assert plan_cli.main([str(PAPER)]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "rollout x32 engines" in out and "step time (roofline)" in out
    data = yaml.safe_load(PAPER.read_text())
    data["placement"]["zero_stage"] = 0
    bad = tmp_path / "z0.yaml"
    bad.write_text(yaml.safe_dump(data))
    assert plan_cli.main([str(bad), "--json"]) == 1
    assert '"fits": false' in capsys.readouterr().out
    data["workload"]["micro_batch"] = 2
    bad.write_text(yaml.safe_dump(data))
    assert cli.main(["plan", str(bad)]) == 2  # bad input: one line from the CLI boundary
    assert "workload.micro_batch: unknown key" in capsys.readouterr().err
    with pytest.raises(PlacementError, match="does not exist"):
        P.load_plan_input(tmp_path / "missing.yaml")


def test_plan_from_trainer_config(tmp_path):
    ppo = Path(__file__).resolve().parents[2] / "configs" / "ppo" / "tiny_cpu.yaml"
    f = tmp_path / "tiny_plan.yaml"
    f.write_text(yaml.safe_dump({
        "ppo_config": str(ppo), "gpu": {"name": "A100-40GB"},
        "placement": {"nodes": 1, "gpus_per_node": 1,
                      "groups": [{"roles": ["actor", "critic", "reference", "reward", "rollout"], "gpus": 1}]},
        "model": {"total_params_b": 0.0001, "layers": 2, "hidden": 64, "kv_heads": 2, "head_dim": 32, "vocab": 384}}))
    inp = P.load_plan_input(f)
    assert inp.workload.rollout_batch_size == 16 and inp.workload.precision == "fp32"
    assert inp.placement.zero_stage == 0 and inp.workload.response_len_max == 12
    assert P.plan(inp).fits


def test_plan_of_the_paper_ppo_config(tmp_path):
    """The PPO engineer's 8x8 template, planned as is (its cluster section, 8-GPU nodes)."""
    ppo = Path(__file__).resolve().parents[2] / "configs" / "ppo" / "bai_olmoe_8x8.yaml"
    data = yaml.safe_load(PAPER.read_text())
    data.pop("placement")
    data["workload"] = {"response_len_mean": 2048, "vllm_gpu_memory_utilization": 0.6}
    data["ppo_config"] = str(ppo)
    f = tmp_path / "from_ppo.yaml"
    f.write_text(yaml.safe_dump(data))
    inp = P.load_plan_input(f)
    assert (inp.workload.rollout_batch_size, inp.workload.mini_batch_size) == (4096, 512)
    assert inp.workload.precision == "bf16" and inp.placement.zero_stage == 3
    assert inp.workload.response_len_max == 8192
    assert (inp.placement.nodes, inp.placement.gpus_per_node, inp.placement.vllm_tp) == (8, 8, 2)
    res = P.plan(inp)
    assert res.vllm["engines"] == 32 and res.fits, res.problems  # 32 engines x TP 2 on all 64 GPUs
    inp.placement.vllm_tp = 1  # one GPU per engine: 25B bf16 weights leave no KV; the plan says why
    res1 = P.plan(inp)
    assert not res1.fits and any("leave no KV cache" in p for p in res1.problems)


def test_plan_reads_the_train_config_itself(capsys):
    """Issue 13 point 6: `rlhf plan` on the very YAML `rlhf train` runs (its `plan:` section adds the GPU
    and the model size), exit 0 = fits, with the same dotted overrides."""
    assert cli.main(["plan", str(PPO_8X8)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("FITS") and "actor deepspeed (ZeRO-3, bf16)" in out
    inp = P.load_plan_input(PPO_8X8)
    assert (inp.workload.rollout_batch_size, inp.workload.mini_batch_size, inp.workload.micro_batch_size) == (4096, 512, 2)
    assert inp.workload.response_len_max == 8192 and inp.workload.prompt_len == 2048
    assert (inp.placement.nodes, inp.placement.gpus_per_node, inp.placement.vllm_tp) == (8, 8, 2)
    assert inp.model.total_params_b == 25 and inp.critic is inp.model
    assert cli.main(["plan", str(PPO_8X8), "deepspeed.zero_stage=0"]) == 1  # 16 B x 25e9 per GPU
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_megatron_variant_fits_and_its_memory_model():
    inp = P.load_plan_input(PPO_8X8_MEGATRON)
    assert inp.engines == {"actor": "megatron", "critic": "megatron"}
    mg = inp.megatron
    assert (mg.tensor_parallel, mg.pipeline_parallel, mg.distributed_optimizer, mg.bf16) == (4, 2, True, True)
    res = P.plan(inp)
    assert res.fits, res.problems
    actor = next(m for m in res.per_gpu["node0/gpu0"] if m.role == "actor")
    # bf16 weights 2 B and fp32 main grads 4 B split over TP x PP = 8; 12 B of optimizer state also over DP = 8
    assert actor.weights == pytest.approx(2 * 25e9 / 8)
    assert actor.grads == pytest.approx(4 * 25e9 / 8)
    assert actor.optimizer == pytest.approx(12 * 25e9 / 8 / 8)
    # without the distributed optimizer or without pipeline parallelism it no longer fits
    no_dist = dataclasses.replace(inp, megatron=dataclasses.replace(mg, distributed_optimizer=False))
    assert not P.plan(no_dist).fits
    assert not P.plan(dataclasses.replace(inp, megatron=dataclasses.replace(mg, pipeline_parallel=1,
                                                                            tensor_parallel=1))).fits


def test_megatron_state_and_activation_formulas():
    w, g, o = P.megatron_state_bytes(1e9, bf16=True, tp=2, pp=2, dp=4, distributed_optimizer=True)
    assert (w, g, o) == (2e9 / 4, 4e9 / 4, 12e9 / 16)
    w, g, o = P.megatron_state_bytes(1e9, bf16=False, tp=1, pp=1, dp=4, distributed_optimizer=False)
    assert (w, g, o) == (4e9, 4e9, 8e9)  # fp32: 16 bytes per parameter, nothing sharded
    m = P.ModelSpec(total_params_b=1, layers=8, hidden=1024)
    full = P.megatron_activation_bytes(m, 1, 1000, tp=1, pp=1, micro_batches=8, recompute=False)
    assert full == pytest.approx(8 * 1000 * 1024 * 34)
    # TP divides the 24 of 34; PP=2 with >= 2 micro-batches in flight keeps L/2 layers x 2
    assert P.megatron_activation_bytes(m, 1, 1000, tp=2, pp=2, micro_batches=8, recompute=False) == \
        pytest.approx(8 * 1000 * 1024 * 22)
    rec = P.megatron_activation_bytes(m, 1, 1000, tp=1, pp=1, micro_batches=8, recompute=True)
    assert rec == pytest.approx(2 * 1000 * 1024 * 8 + 34 * 1000 * 1024)


def test_plan_of_the_tiny_train_config_reads_the_tiny_architecture():
    inp = P.load_plan_input(ROOT / "configs" / "ppo" / "tiny_cpu.yaml")
    assert (inp.model.hidden, inp.model.layers, inp.model.vocab) == (64, 2, 384)
    assert inp.model.total_params_b < 1e-3 and inp.workload.precision == "fp32"
    assert P.plan(inp).fits


def test_plan_yaml_sections_are_built_by_the_typed_builder(tmp_path):
    """Each plan YAML section goes through ``bairlhf.typed_config.build``: errors name the dotted key."""
    cases = [({"model": {"total_params_b": 1}, "gpu": {"name": ["H100"]}}, r"^gpu.name: expected str"),
             ({"model": {"total_params_b": 1}, "placement": {"groups": [{"roles": ["judge"], "gpus": 1}]}},
              r"^placement.groups\[0\].roles\[0\]: must be one of 'actor'"),
             ({"model": {"total_params_b": 1}, "runs": 3}, r"^runs: unknown section"),
             ({"gpu": {}}, r"^model: missing")]
    for i, (data, msg) in enumerate(cases):
        p = tmp_path / f"p{i}.yaml"
        p.write_text(yaml.safe_dump(data))
        with pytest.raises(PlacementError, match=msg):
            P.load_plan_input(p)


def test_plan_of_a_critic_free_config_counts_no_critic(capsys):
    """A critic-free estimator (GRPO) spawns no critic (``rlhf.workers.group.spawn``), so the plan
    places, sizes and times none: less memory per GPU and no critic passes in the step time."""
    groups = ["ppo.n_samples_per_prompt=4"]
    with_critic = P.plan(P.load_plan_input(PPO_8X8, groups))
    grpo = [*groups, "ppo.advantage_estimator=grpo"]
    assert cli.main(["plan", str(PPO_8X8), *grpo]) == 0
    out = capsys.readouterr().out
    assert "critic" not in out and "actor deepspeed (ZeRO-3, bf16)" in out
    inp = P.load_plan_input(PPO_8X8, grpo)
    res = P.plan(inp)
    key = next(iter(res.per_gpu))
    assert [m.role for m in res.per_gpu[key]] == ["actor", "reference", "reward", "rollout"]
    assert res.step_time_s["train"] < with_critic.step_time_s["train"]
    critic_mem = next(m.total for m in with_critic.per_gpu[key] if m.role == "critic")
    assert sum(m.total for m in res.per_gpu[key]) == pytest.approx(
        sum(m.total for m in with_critic.per_gpu[key]) - critic_mem)
