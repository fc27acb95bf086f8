"""The fast driver math (time-major GAE for both lambdas, fewer-pass whitening and token rewards)
equals the previous implementation (kept verbatim as the reference: GAE in
``benchmarks/driver_math.py``, whitening here) and a plain Python loop."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from rlhf import algo
from rlhf.algo.advantages import mask_layout

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from driver_math import legacy_gae as _legacy_gae  # noqa: E402  (the previous gae, kept in the benchmark)


def _legacy_whiten(x, mask, shift_mean=True, eps=1e-8):
    on = mask != 0
    m = mask.to(x.dtype)
    n = mask.sum()
    mean = torch.where(on, x * m, torch.zeros(())).sum() / n.clamp_min(1.0)
    c = torch.where(on, x - mean, torch.zeros(()))
    var = torch.where(on, c.pow(2) * m, torch.zeros(())).sum() / n.clamp_min(1.0)
    var = torch.where(n > 1, var * n / (n - 1).clamp_min(1.0), torch.zeros_like(var))
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(on, out, torch.zeros_like(out))


def _plain_loop(rewards, values, mask, gamma, lam):
    B, T = len(mask), len(mask[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        next_v = next_a = 0.0
        for t in reversed([t for t in range(T) if mask[b][t] != 0]):
            a = rewards[b][t] + gamma * next_v - values[b][t] + gamma * lam * next_a
            adv[b][t], ret[b][t] = a, a + values[b][t]
            next_v, next_a = values[b][t], a
    return torch.tensor(adv), torch.tensor(ret)


def _ragged(kind: str, B: int, T: int, g: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T                                               # one full (truncated) row
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    if kind == "left":
        mask[1::2] = mask[1::2].flip(1)
    elif kind == "holes":
        mask = (torch.rand(B, T, generator=g) < 0.6).float()
    elif kind == "middle":                                       # one run starting anywhere
        start = torch.randint(0, T, (B,), generator=g)
        pos = torch.arange(T)[None]
        mask = ((pos >= start[:, None]) & (pos < start[:, None] + lengths[:, None])).float()
    return mask


LAMBDAS = [(1.0, 0.95, 1.0), (0.99, 0.9, 0.95), (1.0, 1.0, 1.0), (0.5, 0.0, 0.3), (1.0, 0.95, 0.95)]


@pytest.mark.parametrize("kind", ["right", "left", "holes", "middle"])
@pytest.mark.parametrize("shape", [(37, 61), (1, 1), (1, 9), (5, 1), (300, 40)])
def test_gae_equals_previous_implementation_bitwise(kind, shape):
    g = torch.Generator().manual_seed(hash((kind, shape)) % 1000)
    B, T = shape
    mask = _ragged(kind, B, T, g)
    r = torch.randn(B, T, generator=g).masked_fill(mask == 0, float("nan"))   # padding must not leak
    v = torch.randn(B, T, generator=g).masked_fill(mask == 0, float("inf"))
    if kind != "holes":                                          # the fast path is the one under test
        assert mask_layout(mask).contiguous
    for gamma, lam_a, lam_c in LAMBDAS:
        adv0, _ = _legacy_gae(r, v, mask, gamma, lam_a)
        _, ret0 = _legacy_gae(r, v, mask, gamma, lam_c)
        adv1, ret1 = algo.gae_pair(r, v, mask, gamma, lam_a, lam_c)
        assert torch.equal(adv1, adv0) and torch.equal(ret1, ret0)       # within 0, which is within 1e-6
        adv2, ret2 = algo.gae(r, v, mask, gamma, lam_a)
        assert torch.equal(adv2, adv0) and torch.equal(ret2, _legacy_gae(r, v, mask, gamma, lam_a)[1])
        for (a, rt), lam in zip(algo.gae_multi(r, v, mask, gamma, (lam_a, lam_c, 0.5)), (lam_a, lam_c, 0.5)):
            a0, rt0 = _legacy_gae(r, v, mask, gamma, lam)
            assert torch.equal(a, a0) and torch.equal(rt, rt0)
        assert adv1.is_contiguous() and ret1.is_contiguous() and adv1.data_ptr() != ret1.data_ptr()


def test_gae_pair_equals_plain_python_loop():
    rewards = [[0.5, -0.1, 0.2, 1.0, 0.0], [0.0, 0.3, 2.0, 0.0, 0.0], [0.0, 0.0, 0.7, -0.4, 1.5],
               [1.0, 0.0, 0.0, 0.0, 0.0], [0.2, 0.9, 0.0, -1.0, 0.4]]
    values = [[0.1, 0.4, -0.3, 0.2, 7.0], [0.5, 0.5, 0.5, 3.0, 3.0], [9.0, 9.0, 0.1, 0.2, 0.3],
              [0.6, 1.0, 1.0, 1.0, 1.0], [0.3, -0.2, 5.0, 0.1, 0.0]]
    mask = [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 1, 1]]
    r, v, m = torch.tensor(rewards), torch.tensor(values), torch.tensor(mask, dtype=torch.float32)
    for gamma, lam_a, lam_c in LAMBDAS:
        adv, ret = algo.gae_pair(r, v, m, gamma, lam_a, lam_c)
        ref_adv, _ = _plain_loop(rewards, values, mask, gamma, lam_a)
        _, ref_ret = _plain_loop(rewards, values, mask, gamma, lam_c)
        assert torch.allclose(adv, ref_adv, atol=1e-6) and torch.allclose(ret, ref_ret, atol=1e-6)


def test_gae_empty_time_axis():
    adv, ret = algo.gae_pair(torch.zeros(3, 0), torch.zeros(3, 0), torch.zeros(3, 0), 1.0, 0.9, 1.0)
    assert adv.shape == ret.shape == (3, 0)


def test_gae_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must share one"):
        algo.gae_pair(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 1.0, 0.9, 1.0)
    with pytest.raises(ValueError, match="at least one lambda"):
        algo.gae_multi(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), 1.0, ())


@pytest.mark.parametrize("kind", ["right", "left", "holes"])
def test_whiten_equals_previous_formula(kind):
    g = torch.Generator().manual_seed(7)
    mask = _ragged(kind, 64, 50, g)
    x = (3 * torch.randn(64, 50, generator=g) + 1.5).masked_fill(mask == 0, float("nan"))
    for shift in (True, False):
        new, old = algo.masked_whiten(x, mask, shift_mean=shift), _legacy_whiten(x, mask, shift_mean=shift)
        assert torch.isfinite(new).all() and (new[mask == 0] == 0).all()
        assert (new - old).abs().max().item() <= 1e-6
    weighted = mask * torch.rand(64, 50, generator=g)                  # non-binary weights too
    assert (algo.masked_whiten(x, weighted) - _legacy_whiten(x, weighted)).abs().max().item() <= 1e-6
    one = torch.zeros(64, 50)
    one[3, 4] = 1
    x1 = x.nan_to_num(2.5)
    w1 = algo.masked_whiten(x1, one)                                  # n = 1: var 0, no NaN
    assert torch.equal(w1, _legacy_whiten(x1, one)) and (w1 == 0).all()


def test_mask_layout_and_last_token_index():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.float32)
    lay = mask_layout(mask)
    assert lay.last.tolist() == [1, 2, 3, 3] and not lay.contiguous and lay.left_pad
    lay = mask_layout(mask[:3])
    assert lay.contiguous and lay.left_pad
    assert mask_layout(mask[:1]).contiguous and not mask_layout(mask[:1]).left_pad
    assert algo.last_token_index(mask[[0, 1, 3]]).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        algo.last_token_index(mask)


@pytest.mark.parametrize("kind", ["right", "left", "holes", "middle"])
@pytest.mark.parametrize("kl_kind", ["k1", "k3"])
def test_ppo_advantages_equals_the_separate_calls_bitwise(kind, kl_kind):
    g = torch.Generator().manual_seed(11)
    B, T = 48, 33
    mask = _ragged(kind, B, T, g)
    mask[mask.sum(1) == 0, T // 2] = 1                                 # every row has a token
    logp = (-torch.rand(B, T, generator=g) * 3).masked_fill(mask == 0, float("nan"))
    ref = logp + 0.1 * torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g).masked_fill(mask == 0, float("inf"))
    scores = torch.randn(B, generator=g)
    for gamma, lam_a, lam_c in LAMBDAS:
        out = algo.ppo_advantages(scores, logp, ref, values, mask, kl_coef=0.05, kl_kind=kl_kind, gamma=gamma,
                                  lam_actor=lam_a, lam_critic=lam_c)
        rewards, kl = algo.token_rewards(scores, logp, ref, mask, 0.05, kl_kind)
        adv, _ = _legacy_gae(rewards, values, mask, gamma, lam_a)
        _, ret = _legacy_gae(rewards, values, mask, gamma, lam_c)
        assert torch.equal(out.rewards, rewards) and torch.equal(out.kl, kl)
        assert torch.equal(out.advantages, adv) and torch.equal(out.returns, ret)
        assert (out.whitened - _legacy_whiten(adv, mask)).abs().max().item() <= 1e-6
        assert torch.equal(out.whitened, algo.masked_whiten(adv, mask))
    assert algo.ppo_advantages(scores, logp, ref, values, mask, kl_coef=0.05, whiten=False).whitened is None
    empty = mask.clone()
    empty[5] = 0
    with pytest.raises(ValueError, match=r"rows \[5\]"):
        algo.ppo_advantages(scores, logp, ref, values, empty, kl_coef=0.05)
    with pytest.raises(ValueError, match="scores"):
        algo.ppo_advantages(scores[:3], logp, ref, values, mask, kl_coef=0.05)
