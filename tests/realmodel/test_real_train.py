"""`rlhf train` on the real pretrained model (SmolLM2-135M-Instruct) in bf16 mixed precision, with
transformers and with vLLM rollouts: 3 steps pass the step-0 rollout/trainer check, write Hugging
Face checkpoints that ``AutoModelForCausalLM`` loads, and ``rlhf report`` draws the run."""

from __future__ import annotations

import pytest
import torch

from rlhf.cli import main as rlhf_main
from rlhf.config import load_config
from runs import run_train  # tests/support

pytestmark = pytest.mark.slow

SHORT = ["deepspeed.bf16=true", "rollout.max_new_tokens=16", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4",
         "ppo.micro_batch_size=4", "ppo.ppo_epochs=1", "optim.actor_lr=1e-6", "optim.critic_lr=1e-6",
         "trainer.total_steps=3", "trainer.save_every=3", "trainer.probe_every=0"]


@pytest.mark.parametrize("engine,tol", [("hf", 1e-3), pytest.param("vllm", 1e-2, marks=pytest.mark.vllm)])
def test_real_model_bf16_run(real_model, tmp_path, engine, tol):
    run_dir = tmp_path / "run"
    cfg = load_config(None, [f"run_dir={run_dir}", f"model.actor={real_model}", f"rollout.engine={engine}", *SHORT])
    recs = run_train(cfg)
    assert [r["step"] for r in recs] == [1, 2, 3]
    mism = [r["kl/rollout_vs_trainer"] for r in recs]
    assert all(m < tol for m in mism), mism
    for k in ("kl/rollout_vs_trainer_k1", "kl/rollout_vs_trainer_max_abs", "kl/rollout_vs_trainer_ratio_p01",
              "kl/rollout_vs_trainer_ratio_p50", "kl/rollout_vs_trainer_ratio_p99"):
        assert all(k in r for r in recs), k

    from transformers import AutoModelForCausalLM

    actor = run_dir / "checkpoints" / "step_000003" / "actor"
    model = AutoModelForCausalLM.from_pretrained(str(actor))
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.bfloat16

    out = tmp_path / "report"
    assert rlhf_main(["report", str(run_dir), "--out", str(out)]) == 0
    assert (out / "summary.md").exists() and (out / "length.png").exists()
