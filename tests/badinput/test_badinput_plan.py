"""Bad input to `rlhf plan` (a plan YAML or a `rlhf train` config): one line naming the key or
file:line and exit 2 (never 1, which means "does not fit"), nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.badinput.harness import Case, run_case

ROOT = Path(__file__).resolve().parents[2]
PAPER = yaml.safe_load((ROOT / "configs" / "plan" / "paper_moe_8x8.yaml").read_text())
PPO_8X8 = str(ROOT / "configs" / "ppo" / "bai_olmoe_8x8.yaml")
TINY = str(ROOT / "configs" / "ppo" / "tiny_cpu.yaml")
P = ["rlhf", "plan"]


def plan_yaml(**changes):
    """A setup writing the paper plan with ``section={key: value}`` changes (value None: delete the key)."""
    def setup(d: Path) -> None:
        data = yaml.safe_load(yaml.safe_dump(PAPER))
        for section, kv in changes.items():
            if kv is None:
                data.pop(section, None)
            elif isinstance(kv, dict):
                sec = data.setdefault(section, {})
                for k, v in kv.items():
                    sec.pop(k, None) if v is None else sec.__setitem__(k, v)
            else:
                data[section] = kv
        (d / "plan.yaml").write_text(yaml.safe_dump(data))
    return setup


def write(name: str, text: str):
    def setup(d: Path) -> None:
        (d / name).write_text(text)
    return setup


PLAN = P + ["{d}/plan.yaml"]

CASES = [
    # issue 12: printed FITS before
    Case("mfu-negative", PLAN, "workload.mfu: must be in (0, 1]", plan_yaml(workload={"mfu": -1})),
    Case("micro-batch-0", PLAN, "workload.micro_batch_size: must be >= 1", plan_yaml(workload={"micro_batch_size": 0})),
    Case("vllm-util-1.5", PLAN, "workload.vllm_gpu_memory_utilization",
         plan_yaml(workload={"vllm_gpu_memory_utilization": 1.5})),
    Case("precision-fp16", PLAN, "workload.precision: must be one of 'bf16', 'fp32'",
         plan_yaml(workload={"precision": "fp16"})),
    Case("mean-above-max", PLAN, "workload.response_len_mean", plan_yaml(workload={"response_len_mean": 8192})),
    Case("gpu-memory-0", PLAN, "gpu.memory_gb: must be > 0", plan_yaml(gpu={"memory_gb": 0})),
    Case("gpu-reserve-1", PLAN, "gpu.reserve_fraction", plan_yaml(gpu={"reserve_fraction": 1.0})),
    Case("model-params-missing", PLAN, "model.total_params_b: required", plan_yaml(model={"total_params_b": None})),
    Case("model-active-above-total", PLAN, "model.active_params_b", plan_yaml(model={"active_params_b": 30})),
    Case("model-layers-0", PLAN, "model.layers", plan_yaml(model={"layers": 0})),
    Case("unknown-section", PLAN, "bogus: unknown section", plan_yaml(bogus={"x": 1})),
    Case("unknown-workload-key", PLAN, "workload.micro_batch: unknown key", plan_yaml(workload={"micro_batch": 2})),
    Case("megatron-tp-0", PLAN, "megatron.tensor_parallel", plan_yaml(megatron={"tensor_parallel": 0})),
    Case("megatron-tp-does-not-divide", PLAN, "megatron.tensor_parallel: 3 x pipeline_parallel",
         plan_yaml(engine={"actor": "megatron"}, megatron={"tensor_parallel": 3})),
    Case("engine-unknown", PLAN, "engine.critic", plan_yaml(engine={"critic": "fsdp"})),
    Case("override-bad-value", PLAN + ["workload.mfu=[0.3"], "workload.mfu: cannot parse", plan_yaml()),
    Case("override-range", PLAN + ["workload.mfu=0"], "workload.mfu", plan_yaml()),
    Case("yaml-syntax", P + ["{d}/bad.yaml"], "bad.yaml:2", write("bad.yaml", "gpu: {name: H100\nmodel: [\n")),
    Case("yaml-tab", P + ["{d}/tab.yaml"], "tabs", write("tab.yaml", "gpu:\n\tname: H100-80GB\n")),
    Case("missing-file", P + ["{d}/none.yaml"], "does not exist"),
    # the rlhf train config itself
    Case("ppo-plan-mfu", P + [PPO_8X8, "plan.mfu=-1"], "plan.mfu: must be in (0, 1]"),
    Case("ppo-plan-gpu", P + [PPO_8X8, "plan.gpu=B300"], "plan.gpu: must be one of"),
    Case("ppo-micro-batch-0", P + [PPO_8X8, "ppo.micro_batch_size=0"], "ppo.micro_batch_size: must be >= 1"),
    Case("ppo-gamma", P + [PPO_8X8, "ppo.gamma=2"], "ppo.gamma"),
    Case("ppo-mean-above-max", P + [PPO_8X8, "plan.response_len_mean=9000"], "plan.response_len_mean"),
    Case("ppo-megatron-tp", P + [TINY, "engine.critic=megatron", "megatron.pipeline_parallel=2"],
         "megatron.tensor_parallel: tensor_parallel 1 x pipeline_parallel 2 does not divide cluster.critic_workers"),
    Case("ppo-no-model-size", P + [TINY, "model.bai_recipe=recipe.yaml"], "plan.model: needed"),
    Case("ppo-actor-without-config", P + [TINY, "model.actor={d}"], "plan.model: needed"),
    Case("ppo-unknown-key", P + [TINY, "plan.gpus=8"], "plan.gpus: unknown key"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_plan_bad_input(case, tmp_path, capsys, monkeypatch):
    run_case(case, tmp_path, capsys, monkeypatch)
