"""The DeepSpeed training engine on CPU (gloo, one rank): steps, warmup LR, HF export, exact state round trip."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from rlhf.engines.deepspeed_engine import DeepSpeedTrainEngine, EngineSpec

pytestmark = pytest.mark.slow


@pytest.fixture
def dist_env(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _loss(engine, ids):
    out = engine.engine(input_ids=ids, labels=ids)
    return out.loss


@pytest.mark.parametrize("zero,bf16", [(0, False), (1, False), (0, True)])
def test_train_save_load_exact(tiny_llama, tmp_path, dist_env, zero, bf16):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids = torch.randint(0, 300, (4, 12))
    spec = EngineSpec(lr=1e-2, warmup_steps=2, micro_batch_size=2, grad_accum=2, zero_stage=zero, bf16=bf16)
    eng = DeepSpeedTrainEngine(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), spec)
    try:
        dtype = torch.bfloat16 if bf16 else torch.float32
        assert {p.dtype for p in eng.module.parameters()} == {dtype}
        if bf16:  # mixed precision: the optimizer steps fp32 master copies of the bf16 weights
            masters = [p for g in eng.optimizer.fp32_groups for p in g]
            assert masters and {p.dtype for p in masters} == {torch.float32}
        before = {k: v.clone() for k, v in eng.full_state_dict().items()}
        lrs = []
        for _ in range(2):  # two optimizer steps of two micro-batches each
            eng.backward(_loss(eng, ids[:2]))
            assert eng.step() == {}  # not at the accumulation boundary
            eng.backward(_loss(eng, ids[2:]))
            out = eng.step()
            assert set(out) == {"grad_norm", "lr"} and out["grad_norm"] > 0
            lrs.append(out["lr"])
        assert lrs == pytest.approx([1e-2, 1e-2])  # warmed up after 2 steps (1st step ran at lr/2), then constant
        assert eng.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
        after = eng.full_state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before)
        eng.save_state(tmp_path / "state")
        eng.save_pretrained(tmp_path / "hf")
        # one more step from the saved state, twice: identical weights
        eng.backward(_loss(eng, ids[:2])); eng.step(); eng.backward(_loss(eng, ids[2:])); eng.step()
        ref = eng.full_state_dict()
        eng.load_state(tmp_path / "state")
        eng.backward(_loss(eng, ids[:2])); eng.step(); eng.backward(_loss(eng, ids[2:])); eng.step()
        again = eng.full_state_dict()
        for k in ref:
            assert torch.equal(ref[k], again[k]), k
        # state files load with weights_only=True: one that would run code on unpickling is refused
        import pickle
        import shutil

        shutil.copytree(tmp_path / "state", tmp_path / "evil")
        for f in (tmp_path / "evil").rglob("*model_states.pt"):
            torch.save({"module": _Evil(tmp_path / "pwned")}, f)
        with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
            eng.load_state(tmp_path / "evil")
        assert not (tmp_path / "pwned").exists()
    finally:
        eng.destroy()
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=dtype)
    for k, v in hf.state_dict().items():
        if k in after:
            assert torch.equal(v, after[k]), k
