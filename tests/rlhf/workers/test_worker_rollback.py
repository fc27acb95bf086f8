"""The trainable workers' ``scale_lr`` (the ``lr`` rollback, ``rlhf.metrics.actions``) on a real
DeepSpeed engine (CPU, gloo, one rank): the current and the scheduled learning rates are scaled,
the warm-up goes on scaled, and ``save_state`` / ``load_state`` keep the change (so does a resume)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlhf.engines.deepspeed_engine import DeepSpeedTrainEngine, EngineSpec
from rlhf.workers.model_workers import _TrainableBase

pytestmark = pytest.mark.slow


def _step(eng, ids):
    eng.backward(eng.engine(input_ids=ids, labels=ids).loss)
    return eng.step()


@pytest.mark.parametrize("zero", [0, 1])
def test_scale_lr_holds_through_the_schedule_and_the_state(tiny_llama, tmp_path, dist_env, zero):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 12))
    spec = EngineSpec(lr=1e-2, warmup_steps=4, micro_batch_size=2, grad_accum=1, zero_stage=zero)
    eng = DeepSpeedTrainEngine(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), spec)
    try:
        assert _step(eng, ids)["lr"] == pytest.approx(5e-3)            # warm-up: 2/4 of the peak next
        worker = SimpleNamespace(engine=eng)
        assert _TrainableBase.scale_lr(worker, 0.5) == [pytest.approx(2.5e-3)]   # 2/4 x peak x 0.5
        assert _step(eng, ids)["lr"] == pytest.approx(3.75e-3)          # 3/4 x the halved peak
        eng.save_state(tmp_path / "state")
        lrs = [_step(eng, ids)["lr"] for _ in range(2)]
        assert lrs == pytest.approx([5e-3, 5e-3])                        # the halved peak, constant
        eng.load_state(tmp_path / "state")
        assert eng.optimizer.param_groups[0]["lr"] == pytest.approx(3.75e-3)
        assert [_step(eng, ids)["lr"] for _ in range(2)] == pytest.approx(lrs)
    finally:
        eng.destroy()


def test_scale_lr_on_a_plain_adamw_and_lambda_schedule():
    """The pair the megatron engine holds (``engine.optimizer`` AdamW, ``engine.scheduler`` LambdaLR;
    its ``save_state`` writes the param groups and the scheduler state without ``lr_lambdas``)."""
    def pair():
        p = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([p], lr=1e-2)
        return p, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))

    p, opt, sched = pair()
    opt.step(), sched.step()                                            # lr 2/4 x peak
    assert _TrainableBase.scale_lr(SimpleNamespace(engine=SimpleNamespace(optimizer=opt, scheduler=sched)),
                                   0.1) == [pytest.approx(5e-4)]
    assert sched.get_last_lr() == [pytest.approx(5e-4)]
    saved = ({k: v for k, v in opt.state_dict()["param_groups"][0].items() if k != "params"},
             {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"})
    q, opt2, sched2 = pair()
    opt2.load_state_dict({"state": {}, "param_groups": [{**saved[0], "params": [0]}]})
    sched2.load_state_dict({**saved[1], "lr_lambdas": [None]})
    opt2.step(), sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(7.5e-4)          # 3/4 x the scaled peak 1e-3
