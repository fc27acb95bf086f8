"""rlhf.algo against hand-computed numbers, plain Python loops and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf import algo


def test_masked_stats_hand_values_ignore_nan_padding():
    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 5.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert algo.masked_sum(x, m).item() == 11.0
    assert algo.masked_mean(x, m).item() == 11.0 / 4
    assert algo.masked_mean(x, m, dim=1).tolist() == [1.5, 4.0]
    vals = torch.tensor([1.0, 2.0, 3.0, 5.0])
    assert algo.masked_var(x, m).item() == pytest.approx(vals.var(unbiased=True).item())
    assert algo.masked_var(x, m, unbiased=False).item() == pytest.approx(vals.var(unbiased=False).item())
    w = algo.masked_whiten(x, m)
    assert torch.isfinite(w).all() and w[0, 2] == 0 and w[1, 1] == 0
    assert algo.masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-6)
    assert algo.masked_var(w, m).item() == pytest.approx(1.0, abs=1e-5)
    w2 = algo.masked_whiten(x, m, shift_mean=False)
    assert algo.masked_mean(w2, m).item() == pytest.approx(11.0 / 4, abs=1e-5)
    empty = torch.zeros_like(m)
    assert algo.masked_mean(x, empty).item() == 0.0 and algo.masked_var(x, empty).item() == 0.0
    with pytest.raises(ValueError, match="mask"):
        algo.masked_mean(x, m[:, :2])


def _categoricals():
    p = torch.tensor([0.40, 0.25, 0.15, 0.12, 0.08], dtype=torch.float64)
    q = torch.tensor([0.10, 0.30, 0.30, 0.20, 0.10], dtype=torch.float64)
    return p, q


def test_kl_estimators_exact_expectation_equals_closed_form():
    p, q = _categoricals()
    kl_pq = (p * (p / q).log()).sum().item()          # closed form KL(p || q)
    logp, logq = p.log(), q.log()
    for kind in ("k1", "k3"):                          # unbiased: E_p[k] = KL(p || q) exactly
        assert (p * algo.kl_penalty(logp, logq, kind)).sum().item() == pytest.approx(kl_pq, rel=1e-12)
    k2_expect = (p * 0.5 * (logp - logq) ** 2).sum().item()
    assert (p * algo.kl_penalty(logp, logq, "k2")).sum().item() == pytest.approx(k2_expect, rel=1e-12)
    assert (algo.kl_penalty(logp, logq, "k3") >= 0).all() and (algo.kl_penalty(logp, logq, "k2") >= 0).all()
    for kind in algo.KL_KINDS:
        assert algo.kl_penalty(logp, logp, kind).abs().max().item() == 0.0
    with pytest.raises(ValueError, match="k4"):
        algo.kl_penalty(logp, logq, "k4")


def test_kl_estimators_sampled_expectation_matches_closed_form():
    p, q = _categoricals()
    kl_pq = (p * (p / q).log()).sum().item()
    g = torch.Generator().manual_seed(0)
    a = torch.multinomial(p.float(), 200_000, replacement=True, generator=g)
    logp, logq = p.log()[a].float(), q.log()[a].float()
    for kind in ("k1", "k3"):
        k = algo.kl_penalty(logp, logq, kind).double()
        se = k.std().item() / math.sqrt(k.numel())
        assert abs(k.mean().item() - kl_pq) < 4 * se + 1e-6, kind
    # k3 has lower variance than k1 for these close distributions
    assert algo.kl_penalty(logp, logq, "k3").var() < algo.kl_penalty(logp, logq, "k1").var()


def test_k3_guard_keeps_extreme_ratios_finite():
    logp = torch.tensor([0.0, -200.0, -1e-7], dtype=torch.float32)
    ref = torch.tensor([-200.0, 0.0, 0.0], dtype=torch.float32)
    k3 = algo.kl_penalty(logp, ref, "k3")
    assert torch.isfinite(k3).all()
    assert k3[2].item() == pytest.approx(0.5e-14, rel=1e-3)   # expm1 keeps precision near 0
    k3h = algo.kl_penalty(logp.half(), ref.half(), "k3")
    assert k3h.dtype == torch.float32 and torch.isfinite(k3h).all()


def test_logprobs_and_entropy_from_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 7, generator=g)
    labels = torch.randint(0, 7, (2, 3), generator=g)
    for temp in (1.0, 0.7):
        ref = torch.log_softmax(logits / temp, -1).gather(-1, labels[..., None]).squeeze(-1)
        assert torch.allclose(algo.logprobs_from_logits(logits, labels, temp), ref, atol=1e-6)
    probs = torch.softmax(logits, -1)
    ent = -(probs * probs.log()).sum(-1)
    assert torch.allclose(algo.entropy_from_logits(logits), ent, atol=1e-6)
    uniform = torch.zeros(1, 1, 8)
    assert algo.entropy_from_logits(uniform).item() == pytest.approx(math.log(8), rel=1e-6)
    with pytest.raises(ValueError, match="labels"):
        algo.logprobs_from_logits(logits, labels[:, :2])


def test_token_rewards_land_on_last_response_token_for_eos_truncation_and_both_paddings():
    # row 0: right padding (EOS at t=1), row 1: left padding (EOS at t=3), row 2: truncated (full)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.float32)
    logp = torch.tensor([[-1.0, -2.0, float("nan"), 0.0], [0.0, 9.0, -1.0, -1.5], [-0.5] * 4])
    ref = torch.tensor([[-1.5, -1.0, 0.0, 0.0], [0.0, 0.0, -2.0, -1.0], [-0.25] * 4])
    scores = torch.tensor([10.0, 20.0, 30.0])
    rewards, kl = algo.token_rewards(scores, logp, ref, mask, kl_coef=0.1)
    expected_kl = torch.tensor([[0.5, -1.0, 0, 0], [0, 0, 1.0, -0.5], [-0.25] * 4])
    assert torch.allclose(kl, expected_kl)
    expected = torch.tensor([[-0.05, 0.1 + 10, 0, 0], [0, 0, -0.1, 0.05 + 20], [0.025, 0.025, 0.025, 0.025 + 30]])
    assert torch.allclose(rewards, expected)
    assert (rewards[mask == 0] == 0).all()
    assert algo.last_token_index(mask).tolist() == [1, 3, 3]
    r3, k3 = algo.token_rewards(scores, logp, ref, mask, kl_coef=1.0, kl_kind="k3")
    assert torch.allclose(r3[mask != 0], (-k3)[mask != 0] + torch.zeros_like(k3).index_put_(
        (torch.arange(3), torch.tensor([1, 3, 3])), scores)[mask != 0])
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        algo.token_rewards(scores, logp, ref, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]), 0.1)
    with pytest.raises(ValueError, match="scores"):
        algo.token_rewards(scores[:2], logp, ref, mask, 0.1)


def _gae_loop(rewards, values, mask, gamma, lam):
    """Plain Python reference: for each row, walk its response tokens backwards."""
    B, T = len(mask), len(mask[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        idx = [t for t in range(T) if mask[b][t] != 0]
        next_v, next_a = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            a = delta + gamma * lam * next_a
            adv[b][t], ret[b][t] = a, a + values[b][t]
            next_v, next_a = values[b][t], a
    return torch.tensor(adv), torch.tensor(ret)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_plain_double_loop_on_random_masks(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 7, 13
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = torch.zeros(B, T)
    for b in range(B):
        n = int(torch.randint(1, T + 1, (1,), generator=g))
        start = 0 if b % 2 == 0 else T - n            # right padding, then left padding
        mask[b, start:start + n] = 1
    mask[B - 1] = (torch.rand(T, generator=g) < 0.6).float()   # holes inside a response
    mask[B - 1, 0] = 1
    rewards_nan = rewards.masked_fill(mask == 0, float("nan"))   # padding content must not leak
    for gamma, lam in [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.5, 0.0)]:
        adv, ret = algo.gae(rewards_nan * 1, values, mask, gamma, lam)
        ref_adv, ref_ret = _gae_loop(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
        assert torch.allclose(adv, ref_adv, atol=1e-5) and torch.allclose(ret, ref_ret, atol=1e-5)


def test_gae_closed_form_gamma_lambda_one():
    rewards = torch.tensor([[0.1, -0.2, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.3, 0.2, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = algo.gae(rewards, values, mask, 1.0, 1.0)
    assert torch.allclose(adv, torch.tensor([[0.9 - 0.5, 0.8 - 0.3, 1.0 - 0.2, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.9, 0.8, 1.0, 0.0]]))
    # lambda = 0: one-step TD error
    adv0, _ = algo.gae(rewards, values, mask, 1.0, 0.0)
    assert torch.allclose(adv0, torch.tensor([[0.1 + 0.3 - 0.5, -0.2 + 0.2 - 0.3, 1.0 - 0.2, 0.0]]))


def test_policy_loss_hand_values_and_dual_clip():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5]]))   # old_logp = 0 -> ratio = these
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -2.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, st = algo.policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.3)
    # t0: max(-1.5, -1.3) = -1.3 (clipped); t1: max(-0.5, -0.8) = -0.5; t2: max(2.2, 2.2) = 2.2
    assert loss.item() == pytest.approx((-1.3 - 0.5 + 2.2) / 3, rel=1e-5)
    assert st["clipfrac"].item() == pytest.approx(1 / 3)
    assert st["ratio_max"].item() == pytest.approx(1.5, rel=1e-5)
    k3 = [r - 1 - math.log(r) for r in (1.5, 0.5, 1.1)]
    assert st["approx_kl"].item() == pytest.approx(sum(k3) / 3, rel=1e-5)
    # dual clip: a negative-advantage token with a huge ratio is capped at -c A
    logp2 = torch.log(torch.tensor([[5.0, 1.0]]))
    adv2, mask2 = torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2)
    plain, _ = algo.policy_loss(logp2, torch.zeros(1, 2), adv2, mask2)
    dual, st2 = algo.policy_loss(logp2, torch.zeros(1, 2), adv2, mask2, dual_clip=3.0)
    assert plain.item() == pytest.approx((5.0 - 1.0) / 2, rel=1e-5)
    assert dual.item() == pytest.approx((3.0 - 1.0) / 2, rel=1e-5)
    assert st2["dual_clipfrac"].item() == 0.5
    with pytest.raises(ValueError, match="dual_clip"):
        algo.policy_loss(logp2, torch.zeros(1, 2), adv2, mask2, dual_clip=0.5)
    w = algo.truncated_is_weights(torch.log(torch.tensor([[3.0, 0.5]])), torch.zeros(1, 2), mask2, cap=2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 0.5]]))
    weighted, _ = algo.policy_loss(logp2, torch.zeros(1, 2), adv2, mask2, is_weights=w)
    assert weighted.item() == pytest.approx((5.0 * 2.0 - 1.0 * 0.5) / 2, rel=1e-5)


def test_value_loss_hand_values():
    values = torch.tensor([[1.0, 0.0, 2.0]])
    old = torch.tensor([[0.5, 0.5, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, st = algo.value_loss(values, old, returns, mask, clip=0.2)
    # t0: V-R = -1 ; clipped V = 0.7 -> -1.3 ; max(1, 1.69) = 1.69
    # t1: V-R = 0 ; clipped V = 0.3 -> 0.3 ; max(0, 0.09) = 0.09
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09) / 2, rel=1e-5)
    assert st["vf_clipfrac"].item() == 1.0
    plain, _ = algo.value_loss(values, old, returns, mask, clip=None)
    assert plain.item() == pytest.approx(0.5 * (1.0 + 0.0) / 2, rel=1e-6)


def _split_grad(loss_fn, parts, num_tokens, world):
    """Per rank: sum of micro-batch losses, backward; then average gradients over ranks."""
    grads = []
    for rank_parts in parts:
        theta = torch.zeros(3, requires_grad=True)
        total = sum(loss_fn(theta, sl, num_tokens, world) for sl in rank_parts)
        (g,) = torch.autograd.grad(total, theta)
        grads.append(g)
    return torch.stack(grads).mean(0)


@pytest.mark.parametrize("which", ["policy", "value"])
def test_loss_aggregation_invariant_to_dp_ranks_and_micro_batches(which):
    g = torch.Generator().manual_seed(3)
    B, T = 8, 9
    lengths = [1, 9, 3, 7, 2, 8, 5, 4]                       # very unequal token counts per row
    mask = torch.zeros(B, T)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    feats = torch.randn(B, T, 3, generator=g)
    base = torch.randn(B, T, generator=g) - 1
    adv = torch.randn(B, T, generator=g)
    old = base + 0.1 * torch.randn(B, T, generator=g)

    def loss_fn(theta, sl, num_tokens, world):
        out = base[sl] + feats[sl] @ theta * 0.3 + feats[sl] @ theta.pow(2)   # a tiny "model"
        if which == "policy":
            return algo.policy_loss(out, old[sl], adv[sl], mask[sl], 0.2, 0.28, dual_clip=3.0,
                                    num_tokens=num_tokens, dp_world_size=world)[0]
        return algo.value_loss(out, old[sl], adv[sl], mask[sl], clip=0.2, num_tokens=num_tokens,
                               dp_world_size=world)[0]

    # reference: one process, one micro-batch, plain local token mean
    theta = torch.full((3,), 0.0, requires_grad=True)
    (g_full,) = torch.autograd.grad(loss_fn(theta, slice(0, B), None, 1), theta)
    n = mask.sum().item()
    for parts, world in [
        ([[slice(0, 8)]], 1),
        ([[slice(0, 3), slice(3, 8)]], 1),                               # 2 micro-batches
        ([[slice(0, 4)], [slice(4, 8)]], 2),                             # 2 DP ranks
        ([[slice(0, 1), slice(1, 4)], [slice(4, 6), slice(6, 8)]], 2),   # 2 ranks x 2 micro-batches
        ([[slice(2 * r, 2 * r + 1), slice(2 * r + 1, 2 * r + 2)] for r in range(4)], 4),
    ]:
        assert torch.allclose(_split_grad(loss_fn, parts, n, world), g_full, atol=1e-6), (parts, world)
    # and the naive per-micro-batch mean is NOT invariant (why num_tokens exists)
    naive = torch.stack([torch.autograd.grad(loss_fn(t, sl, None, 1), t)[0]
                         for t, sl in [(torch.zeros(3, requires_grad=True), slice(0, 4)),
                                       (torch.zeros(3, requires_grad=True), slice(4, 8))]]).mean(0)
    assert not torch.allclose(naive, g_full, atol=1e-4)


def test_adaptive_kl_coef():
    assert algo.adaptive_kl_coef(0.1, 0.2, 0.1, 10_000, 512) == pytest.approx(0.1 * (1 + 0.2 * 512 / 10_000))
    assert algo.adaptive_kl_coef(0.1, 0.09, 0.1, 100, 10) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    with pytest.raises(ValueError, match="target_kl"):
        algo.adaptive_kl_coef(0.1, 0.1, 0.0, 100, 10)
