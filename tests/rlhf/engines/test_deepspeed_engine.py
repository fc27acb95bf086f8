"""The DeepSpeed training engine on CPU (gloo, one rank): steps, warmup LR, HF export, exact state round trip."""

from __future__ import annotations

import os

import pytest
import torch

from rlhf.engines.deepspeed_engine import DeepSpeedTrainEngine, EngineSpec

pytestmark = pytest.mark.slow


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


def test_registry_names_both_backends_with_the_whole_interface():
    from rlhf.engines.base import ENGINES, engine_class

    assert set(ENGINES) == {"deepspeed", "megatron"}
    for name in ENGINES:
        cls = engine_class(name)
        for member in ("from_pretrained", "forward", "forward_backward", "step", "export_weights",
                       "save_pretrained", "save_state", "load_state", "destroy"):
            assert callable(getattr(cls, member)), (name, member)
    with pytest.raises(ValueError, match="'nope' is not one of deepspeed, megatron"):
        engine_class("nope")


def test_policy_from_pretrained_forward_and_update(tiny_llama, dist_env):
    """The interface on the policy: forward equals the HF forward it wraps (bitwise), forward_backward
    micro-batches one optimizer step (grad_accum micro-batches), export_weights has the HF names."""
    from rlhf.algo import logprobs_from_logits
    from rlhf.config import DeepSpeedConfig
    from rlhf.engines.base import EngineArgs, Generation
    from rlhf.engines.deepspeed_engine import policy_logits
    from rlhf.workers.batch import collate

    g = torch.Generator().manual_seed(0)
    gens = [Generation(prompt_ids=torch.randint(3, 300, (3 + i % 3,), generator=g).tolist(),
                       response_ids=torch.randint(3, 300, (2 + i,), generator=g).tolist(),
                       logprobs=[0.0] * (2 + i), finished=True) for i in range(4)]
    batch = collate(gens, pad_id=0)
    args = EngineArgs(lr=1e-2, micro_batch_size=2, grad_accum=2, temperature=0.7)
    eng = DeepSpeedTrainEngine.from_pretrained(tiny_llama, "policy", DeepSpeedConfig(), args)
    try:
        out = eng.forward(batch)
        assert set(out) == {"logp", "entropy"} and out["logp"].shape == batch.mask.shape
        with torch.no_grad():
            want = logprobs_from_logits(policy_logits(eng.module, batch, 0.7), batch.responses)
        assert torch.equal(out["logp"], want)
        seen = []

        def loss_fn(o, sub):
            seen.append(sub.mask.shape[0])
            return -(o["logp"] * sub.mask).sum() / batch.mask.sum(), {"tokens": sub.mask.sum()}

        recs = eng.forward_backward(batch, loss_fn)
        assert seen == [2, 2] and [set(r) for r in recs] == [{"tokens", "loss"}] * 2
        step = eng.step()
        assert set(step) == {"grad_norm", "lr"} and step["grad_norm"] > 0
        assert eng.forward(batch)["logp"][batch.mask > 0].mean() > want[batch.mask > 0].mean()
        names = [n for n, _ in eng.export_weights()]
        assert names == [n for n, _ in eng.module.named_parameters()] and eng.dp_size == 1
    finally:
        eng.destroy()
