"""The typed records between stages (``rlhf.workers.batch``, ``rlhf.workers.specs``): every field is
documented, row selection and device moves keep the record's class, records survive pickling (Ray),
and the specs the group builds carry the config's values (fast, no Ray workers)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import pickle
import textwrap

import pytest
import torch

from rlhf.config import load_config
from rlhf.engines.base import EngineArgs, Generation
from rlhf.engines.megatron.engine import RightPadded
from rlhf.workers import batch as batch_mod, specs as specs_mod
from rlhf.workers.batch import RolloutBatch, ScoredBatch, collate
from rlhf.workers.group import ModelPaths, Workers, frozen_specs, trainable_spec


def _records() -> list[type]:
    mods = [batch_mod, specs_mod]
    found = [c for m in mods for _, c in inspect.getmembers(m, inspect.isclass)
             if dataclasses.is_dataclass(c) and c.__module__ == m.__name__]
    return found + [EngineArgs, ModelPaths, Workers, RightPadded]


def _undocumented(cls: type) -> list[str]:
    """Fields of ``cls`` (its own, not inherited) without a docstring right below the annotation."""
    node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    missing = []
    for stmt, nxt in zip(node.body, node.body[1:] + [None]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            documented = (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                          and isinstance(nxt.value.value, str) and nxt.value.value.strip())
            if not documented:
                missing.append(stmt.target.id)
    return missing


def test_every_record_field_has_a_docstring():
    classes = _records()
    assert {RolloutBatch, ScoredBatch, specs_mod.TrainableSpec, specs_mod.RolloutSpec} <= set(classes)
    for cls in classes:
        assert cls.__doc__ and not _undocumented(cls), (cls.__name__, _undocumented(cls))


def test_field_check_sees_a_missing_docstring():
    @dataclasses.dataclass
    class Half:
        a: int
        """Documented."""
        b: int

    assert _undocumented(Half) == ["b"]


def _batch() -> RolloutBatch:
    gens = [Generation([5, 6, 7], [11, 12, 9], [-1.0, -2.0, -3.0], True),
            Generation([5], [13, 14, 15, 16], [-1.0] * 4, False),
            Generation([5, 6], [9], [-0.5], True)]
    return collate(gens, pad_id=0)


def _scored(b: RolloutBatch, is_weights=None) -> ScoredBatch:
    t = torch.arange(b.mask.numel(), dtype=torch.float32).view_as(b.mask)
    return ScoredBatch.of(b, old_logp=t, old_values=t + 1, returns=t + 2, advantages=t + 3, is_weights=is_weights)


@pytest.mark.parametrize("weights", [False, True])
def test_select_rows_and_to_keep_the_class_and_every_field(weights):
    b = _batch()
    s = _scored(b, torch.rand(b.mask.shape) if weights else None)
    assert s.input_ids is b.input_ids and s.prompt_len == b.prompt_len  # shared, not copied
    for rec in (b, s):
        sub = rec.select_rows([2, 0])
        assert type(sub) is type(rec) and sub.num_rows == 2
        for f in dataclasses.fields(rec):
            v, w = getattr(rec, f.name), getattr(sub, f.name)
            if torch.is_tensor(v):
                assert w.dtype == v.dtype and torch.equal(w, v[[2, 0]]), f.name
            else:
                assert w == v, f.name
        moved = rec.to("cpu")
        assert type(moved) is type(rec) and all(
            torch.equal(getattr(moved, f.name), getattr(rec, f.name)) if torch.is_tensor(getattr(rec, f.name))
            else getattr(moved, f.name) == getattr(rec, f.name) for f in dataclasses.fields(rec))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.mask = s.mask


def test_records_pickle_exactly():
    b = _batch()
    s = _scored(b, torch.rand(b.mask.shape))
    for rec in (b, s):
        back = pickle.loads(pickle.dumps(rec))
        assert type(back) is type(rec)
        for f in dataclasses.fields(rec):
            v = getattr(rec, f.name)
            assert torch.equal(getattr(back, f.name), v) if torch.is_tensor(v) else getattr(back, f.name) == v


def test_specs_carry_the_config():
    cfg = load_config(None, ["ppo.clip_low=0.1", "ppo.value_clip=0.3", "trainer.threads_per_worker=2",
                             "optim.critic_lr=2e-5"])
    paths = ModelPaths(actor="a", reference="r", critic="c", tokenizer="t")
    actor, critic = trainable_spec(cfg, "actor", paths.actor), trainable_spec(cfg, "critic", paths.critic)
    assert (actor.model_path, critic.model_path, actor.engine, actor.threads) == ("a", "c", cfg.engine.actor, 2)
    assert actor.loss == critic.loss and (actor.loss.clip_low, actor.loss.value_clip) == (0.1, 0.3)
    assert critic.args.lr == 2e-5 and actor.settings is cfg.deepspeed
    ref, reward, rollout = frozen_specs(cfg, paths, pad_id=0, eos_id=9)
    assert (ref.model_path, ref.temperature, reward.tokenizer_path, reward.function) == (
        "r", cfg.rollout.temperature, "t", cfg.reward.function)
    assert (rollout.engine, rollout.model_path, rollout.pad_id, rollout.eos_id, rollout.vllm) == ("hf", "a", 0, 9, None)
    for spec in (actor, ref, reward, rollout):
        assert pickle.loads(pickle.dumps(spec)) == spec
