"""Bad input to `rlhf train`: config values out of their documented ranges, bad enums, bad
overrides, broken YAML and malformed prompt files. Each is one line naming the key (or
file:line), exit 2, before any work: no run directory, no tiny model, no config.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.badinput.harness import Case, run_case


def write(name: str, text: str):
    """A setup that writes ``text`` to ``name`` in the case's directory."""
    def setup(d: Path) -> None:
        (d / name).write_text(text)
    return setup


def prompts(*lines: str):
    return write("p.jsonl", "".join(line + "\n" for line in lines))


OK = json.dumps({"prompt": "what is 1 plus 2?"})
T = ["rlhf", "train"]

CASES = [
    # ranges (issue 12: accepted silently before)
    Case("gamma-negative", T + ["ppo.gamma=-1"], "ppo.gamma: must be in [0, 1]"),
    Case("megatron-actor-top-p", T + ["engine.actor=megatron", "rollout.top_p=0.9"], "engine.actor: megatron has no"),
    Case("gamma-above-one", T + ["ppo.gamma=1.5"], "ppo.gamma"),
    Case("lam-actor-2", T + ["ppo.lam_actor=2"], "ppo.lam_actor"),
    Case("lam-critic-negative", T + ["ppo.lam_critic=-0.1"], "ppo.lam_critic"),
    Case("kl-coef-negative", T + ["ppo.kl_coef=-5"], "ppo.kl_coef: must be >= 0"),
    Case("reward-clip-negative", T + ["reward.clip=-1"], "reward.clip: must be > 0"),
    Case("max-prompt-tokens-0", T + ["data.max_prompt_tokens=0"], "data.max_prompt_tokens"),
    Case("top-k-negative", T + ["rollout.top_k=-3"], "rollout.top_k: must be >= 0"),
    Case("top-p-zero", T + ["rollout.top_p=0"], "rollout.top_p"),
    Case("top-p-above-one", T + ["rollout.top_p=1.5"], "rollout.top_p"),
    Case("temperature-zero", T + ["rollout.temperature=0"], "rollout.temperature"),
    Case("max-new-tokens-0", T + ["rollout.max_new_tokens=0"], "rollout.max_new_tokens"),
    Case("actor-lr-negative", T + ["optim.actor_lr=-1e-4"], "optim.actor_lr"),
    Case("critic-lr-nan", T + ["optim.critic_lr=.nan"], "optim.critic_lr: must be a finite number"),
    Case("actor-lr-nan-string", T + ["optim.actor_lr=nan"], "optim.actor_lr"),
    Case("actor-lr-inf", T + ["optim.actor_lr=.inf"], "optim.actor_lr"),
    Case("beta-above-one", T + ["optim.betas=[0.9, 1.5]"], "optim.betas"),
    Case("grad-clip-negative", T + ["optim.grad_clip=-1"], "optim.grad_clip"),
    Case("clip-low-1.5", T + ["ppo.clip_low=1.5"], "ppo.clip_low"),
    Case("dual-clip-below-one", T + ["ppo.dual_clip=0.5"], "ppo.dual_clip: must be > 1"),
    Case("value-clip-zero", T + ["ppo.value_clip=0"], "ppo.value_clip"),
    Case("kl-target-negative", T + ["ppo.kl_target=-0.1"], "ppo.kl_target"),
    Case("missing-eos-penalty-negative", T + ["reward.missing_eos_penalty=-1"], "reward.missing_eos_penalty"),
    Case("save-every-negative", T + ["trainer.save_every=-1"], "trainer.save_every"),
    Case("keep-checkpoints-0", T + ["trainer.keep_checkpoints=0"], "trainer.keep_checkpoints"),
    Case("actor-workers-0", T + ["cluster.actor_workers=0"], "cluster.actor_workers"),
    Case("seed-negative", T + ["seed=-1"], "seed: must be >= 0"),
    Case("zero-stage-4", T + ["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    Case("tiny-heads-do-not-divide", T + ["model.tiny.num_heads=3"], "model.tiny.num_heads"),
    # enums (Literal)
    Case("kl-kind", T + ["ppo.kl_kind=k9"], "ppo.kl_kind: must be one of 'k1', 'k2', 'k3'"),
    Case("rollout-engine", T + ["rollout.engine=sglang"], "rollout.engine"),
    Case("weight-sync", T + ["rollout.weight_sync=nccl"], "rollout.weight_sync"),
    Case("tiny-arch", T + ["model.tiny.arch=gpt2"], "model.tiny.arch"),
    Case("engine-actor", T + ["engine.actor=fsdp"], "engine.actor: must be one of 'deepspeed', 'megatron'"),
    Case("megatron-tp-0", T + ["megatron.tensor_parallel=0"], "megatron.tensor_parallel"),
    Case("megatron-tp-does-not-divide", T + ["engine.actor=megatron", "megatron.tensor_parallel=3"],
         "megatron.tensor_parallel: tensor_parallel 3 x pipeline_parallel 1 does not divide cluster.actor_workers"),
    # overrides and keys
    Case("override-bad-yaml", T + ["ppo.mini_batch_size=[8"], "ppo.mini_batch_size: cannot parse override value"),
    Case("override-not-key-value", T + ["tiny_cpu.yaml"], "tiny_cpu.yaml"),
    Case("override-wrong-type", T + ["trainer.total_steps=1.5"], "trainer.total_steps: expected int"),
    Case("override-unknown-key", T + ["ppo.gae_lambda=0.9"], "ppo.gae_lambda: unknown key"),
    Case("override-into-a-value", T + ["seed.x=1"], "seed: is not a section"),
    Case("reward-function-no-colon", T + ["reward.function=digit_ratio"], "reward.function"),
    Case("mini-batch-does-not-divide", T + ["ppo.mini_batch_size=5"], "ppo.mini_batch_size"),
    # YAML files
    Case("yaml-syntax", T + ["{d}/bad.yaml"], "bad.yaml:3:5: YAML syntax error", write("bad.yaml", "ppo:\n  gamma: [1\nseed: 0\n")),
    Case("yaml-tab", T + ["{d}/tab.yaml"], "tabs", write("tab.yaml", "ppo:\n\tgamma: 1.0\n")),
    Case("yaml-not-a-mapping", T + ["{d}/list.yaml"], "must be a mapping", write("list.yaml", "- 1\n- 2\n")),
    Case("yaml-missing-file", T + ["{d}/nope.yaml"], "does not exist"),
    Case("yaml-section-not-mapping", T + ["{d}/s.yaml"], "ppo: expected a mapping", write("s.yaml", "ppo: 3\n")),
    # data files (issue 12: tracebacks after config.yaml and the tiny model were written)
    Case("builtin-unknown", T + ["data.path=builtin:foo"], "data.path: unknown built-in prompt set 'builtin:foo'"),
    Case("prompts-missing-file", T + ["data.path={d}/none.jsonl"], "data.path"),
    Case("prompts-empty", T + ["data.path={d}/p.jsonl"], "holds no prompts", prompts()),
    Case("prompts-blank-lines-only", T + ["data.path={d}/p.jsonl"], "holds no prompts", prompts("", "  ")),
    Case("prompts-bad-json", T + ["data.path={d}/p.jsonl"], "p.jsonl:2: not valid JSON", prompts(OK, "{oops")),
    Case("prompts-line-is-number", T + ["data.path={d}/p.jsonl"], "p.jsonl:1: expected a JSON object",
         prompts("42")),
    Case("prompts-missing-field", T + ["data.path={d}/p.jsonl"], "p.jsonl:2: record has no 'prompt' field",
         prompts(OK, json.dumps({"question": "x"}))),
    Case("prompts-custom-key-missing", T + ["data.path={d}/p.jsonl", "data.prompt_key=text"],
         "p.jsonl:1: record has no 'text' field", prompts(OK)),
    Case("prompts-field-not-text", T + ["data.path={d}/p.jsonl"], "p.jsonl:1: field 'prompt' must be a string",
         prompts(json.dumps({"prompt": 7}))),
    Case("prompts-empty-string", T + ["data.path={d}/p.jsonl"], "p.jsonl:2: field 'prompt' is an empty string",
         prompts(OK, json.dumps({"prompt": " "}))),
    Case("prompts-bad-messages", T + ["data.path={d}/p.jsonl"], "p.jsonl:1: field 'prompt'",
         prompts(json.dumps({"prompt": [{"role": "user"}]}))),
    Case("prompts-not-utf8", T + ["data.path={d}/p.jsonl"], "data.path: cannot read",
         lambda d: (d / "p.jsonl").write_bytes(b"\xff\xfe\x00bad\n")),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_train_bad_input(case, tmp_path, capsys, monkeypatch):
    run_case(case, tmp_path, capsys, monkeypatch)
