"""Padding-free micro-batching (``ppo.max_tokens_per_micro_batch``, issue 16.1).

Pure parts against hand-worked groupings; then the DeepSpeed engine on one gloo rank in fp32:
the token-budget path (rows sorted by length, groups trimmed of all-padding columns) gives the
padded path's outputs, losses, statistics and gradients within 1e-5, for the policy and the critic.
"""

from __future__ import annotations


import pytest
import torch

from rlhf.workers.batch import RolloutBatch, ScoredBatch, collate, forward_in_micro_batches, token_budget_micro_batches


def test_groups_by_padded_size_longest_first():
    # lengths (prompt, response): row 0 (2, 6) = 8, row 1 (3, 1) = 4, row 2 (2, 2) = 4, row 3 (4, 5) = 9
    p, r = [2, 3, 2, 4], [6, 1, 2, 5]
    # sorted: 3 (9), 0 (8), 1 (4), 2 (4). Budget 18: {3, 0}: 2 x (4 + 6) = 20 > 18 -> {3}; {0, 1}: 2 x (3 + 6)
    # = 18 fits; + 2: 3 x 9 = 27 > 18 -> {2}
    assert token_budget_micro_batches(p, r, 18) == [[3], [0, 1], [2]]
    assert token_budget_micro_batches(p, r, 40) == [[0, 1, 2, 3]]  # 4 x (4 + 6) = 40
    assert token_budget_micro_batches(p, r, 1) == [[3], [0], [1], [2]]  # each row alone, even over budget
    # at least 3 groups: the largest group is halved in its longest-first order (3, 0 | 1, 2), then the
    # larger half by padded size ({3, 0}: 2 x 10 = 20 > {1, 2}: 2 x 5)
    assert token_budget_micro_batches(p, r, 40, parts=3) == [[3], [0], [1, 2]]
    assert token_budget_micro_batches(p, r, 40, parts=9) == [[3], [0], [1], [2]]  # never below one row
    assert token_budget_micro_batches([], [], 8) == []
    with pytest.raises(ValueError, match="max_tokens"):
        token_budget_micro_batches(p, r, 0)
    with pytest.raises(ValueError, match="4 prompt lengths but 3"):
        token_budget_micro_batches(p, r[:3], 8)


def _batch() -> RolloutBatch:
    from rlhf.engines.base import Generation

    gens = [Generation([5, 6], [7, 8, 9], [-0.1, -0.2, -0.3], True),
            Generation([5, 6, 7, 8], [9], [-0.5], True),
            Generation([4], [3, 2], [-0.7, -0.8], False)]
    return collate(gens, pad_id=0)


def test_trimmed_drops_only_all_padding_columns():
    b = _batch()  # P = 4, T = 3
    sub = b.select_rows([0, 2]).trimmed()  # prompts 2 and 1 -> P' = 2; responses 3 and 2 -> T' = 3
    assert sub.prompt_len == 2 and sub.input_ids.tolist() == [[5, 6, 7, 8, 9], [0, 4, 3, 2, 0]]
    assert sub.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 0]]
    assert sub.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 2, 2]]
    assert sub.mask.tolist() == [[1, 1, 1], [1, 1, 0]] and sub.responses.tolist() == [[7, 8, 9], [3, 2, 0]]
    one = b.select_rows([1]).trimmed()
    assert one.prompt_len == 4 and one.input_ids.tolist() == [[5, 6, 7, 8, 9]] and one.rollout_logp.tolist() == [[-0.5]]
    assert b.trimmed() is b  # nothing to cut
    scored = ScoredBatch.of(b, old_logp=b.rollout_logp, old_values=None, returns=None, advantages=b.mask)
    t = scored.select_rows([2]).trimmed()
    assert type(t) is ScoredBatch and t.advantages.shape == (1, 2) and t.old_values is None


def test_forward_in_micro_batches_restores_row_order():
    b = _batch()
    seen = []

    def fn(sub):
        seen.append(sub.input_ids.shape)
        return {"first": sub.input_ids[:, 0].float(), "resp": sub.responses.float()}

    out = forward_in_micro_batches(b, [[1], [0, 2], []], fn)
    assert seen == [(1, 5), (2, 5), (1, 5)]  # the empty group ran on row 0, its result dropped
    assert out["first"].tolist() == [5.0, 5.0, 0.0]  # row 2 (prompt [4]) is left-padded to row 0's 2
    assert out["resp"].tolist() == [[7, 8, 9], [9, 0, 0], [3, 2, 0]]


# ----------------------------------------------------------------------------- the engine, fp32


def _spread_batch(n=6, seed=0) -> ScoredBatch:
    from rlhf.engines.base import Generation

    g = torch.Generator().manual_seed(seed)
    gens = []
    for i in range(n):
        p = int(torch.randint(2, 9, (1,), generator=g))
        r = [1, 3, 17, 5, 24, 2][i % 6]
        gens.append(Generation(torch.randint(1, 300, (p,), generator=g).tolist(),
                               torch.randint(1, 300, (r,), generator=g).tolist(), [-1.0] * r, True))
    b = collate(gens, pad_id=0)
    adv = torch.randn(b.mask.shape, generator=g) * b.mask
    old = (torch.randn(b.mask.shape, generator=g) * 0.1 - 5.0) * b.mask
    vals = torch.randn(b.mask.shape, generator=g) * b.mask
    return ScoredBatch.of(b, old_logp=old, old_values=vals, returns=vals + adv, advantages=adv)


def _run(model_dir, role, budget, batch):
    from rlhf.algo import policy_loss, value_loss
    from rlhf.engines.deepspeed_engine import DeepSpeedTrainEngine, EngineSpec, load_hf_model

    torch.manual_seed(0)
    spec = EngineSpec(lr=1e-3, micro_batch_size=2, grad_accum=3, max_tokens_per_micro_batch=budget)
    eng = DeepSpeedTrainEngine(load_hf_model(model_dir, role, torch.float32, seed=0), spec, role=role,
                               temperature=0.7)
    ntok = float(batch.mask.sum())
    try:
        fwd = eng.forward(batch)

        def loss_fn(out, sub):
            if role == "policy":
                return policy_loss(out["logp"], sub.old_logp, sub.advantages, sub.mask, num_tokens=ntok)
            return value_loss(out["values"], sub.old_values, sub.returns, sub.mask, num_tokens=ntok)

        recs = eng.forward_backward(batch, loss_fn)
        grads = {n: p.grad.detach().clone() for n, p in eng.module.named_parameters() if p.grad is not None}
        step = eng.step()
        return fwd, recs, grads, step
    finally:
        eng.destroy()


@pytest.mark.slow
@pytest.mark.parametrize("role", ["policy", "critic"])
def test_token_budget_equals_padded_path(tiny_llama, dist_env, role):
    from rlhf.metrics.batch import ACTOR_STAT_NAMES, CRITIC_STAT_NAMES, reduce_update_stats

    batch = _spread_batch()
    fwd0, recs0, grads0, step0 = _run(tiny_llama, role, 0, batch)
    fwd1, recs1, grads1, step1 = _run(tiny_llama, role, 40, batch)
    assert len(recs0) == 3 and len(recs1) > 3  # 3 padded micro-batches of 2; more, smaller ones by budget
    m = batch.mask.bool()
    for k in fwd0:
        assert torch.allclose(fwd0[k][m], fwd1[k][m], atol=1e-5, rtol=0), k
    assert sum(r["loss"] for r in recs0) == pytest.approx(sum(r["loss"] for r in recs1), abs=1e-5)
    ntok = float(batch.mask.sum())
    for rec in recs0 + recs1:  # as the worker reports them: each micro-batch's loss as its local token mean
        rec["loss"] = rec["loss"] * ntok / rec["tokens"]
    names = {**(ACTOR_STAT_NAMES if role == "policy" else CRITIC_STAT_NAMES), "grad_norm": "grad_norm"}
    s0, s1 = reduce_update_stats(recs0 + [step0], names), reduce_update_stats(recs1 + [step1], names)
    assert s0.keys() == s1.keys()
    for k in s0:
        assert s0[k] == pytest.approx(s1[k], abs=1e-5, rel=1e-5), k
    assert grads0.keys() == grads1.keys() and grads0
    for n in grads0:
        assert torch.allclose(grads0[n], grads1[n], atol=1e-5, rtol=1e-4), n
