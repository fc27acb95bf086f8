"""The advantage-estimator registry against numbers worked out by hand (written as literals)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf import algo
from rlhf.algo import AdvantageInputs, compute_advantages

NAN = float("nan")

# 4 rows, T = 3, ragged: lengths 1, 3, 2 (left padded), 3
MASK4 = torch.tensor([[1, 0, 0], [1, 1, 1], [0, 1, 1], [1, 1, 1]], dtype=torch.float32)


def _per_row(adv: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """The one value each row carries on its response tokens (checks it is the same on all of them)."""
    out = []
    for row, m in zip(adv, mask):
        vals = row[m != 0]
        assert torch.all(vals == vals[0]), f"row advantages differ across tokens: {row.tolist()}"
        out.append(float(vals[0]))
    assert (adv[mask == 0] == 0).all(), "advantages must be 0 on padding"
    return out


def test_registry_names_and_attributes():
    assert algo.ESTIMATOR_NAMES == ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp")
    assert [n for n, e in algo.ESTIMATORS.items() if e.needs_critic] == ["gae"]
    assert [n for n, e in algo.ESTIMATORS.items() if e.needs_groups] == ["grpo", "dr_grpo", "rloo"]
    assert [n for n, e in algo.ESTIMATORS.items() if e.trainer_whitens] == ["gae"]
    assert algo.get_estimator("dr_grpo").loss_agg == "token_sum_norm"
    assert all(e.loss_agg in algo.LOSS_AGGS and e.reference and e.fn.__doc__ for e in algo.ESTIMATORS.values())
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo'.*gae, grpo, dr_grpo, rloo, reinforce_pp"):
        algo.get_estimator("ppo")


# groups of 2: scores (1, 3) and (0.1, 0.1) (identical); groups of 4: (0, 1, 2, 5) and four 0.3s.
# grpo, n=2: mean 2, std sqrt(((1-2)^2 + (3-2)^2) / 1) = sqrt(2) -> -+1/sqrt(2) = -+0.70710678
# grpo, n=4: mean 2, deviations (-2, -1, 0, 3), std sqrt(14 / 3) = 2.1602469
#            -> (-0.92582010, -0.46291005, 0, 1.38873015)
# dr_grpo: the deviations themselves; rloo: r_i - (sum - r_i) / (n - 1):
#   n=2: 1 - 3 = -2, 3 - 1 = 2; n=4: sum 8 -> 0 - 8/3, 1 - 7/3, 2 - 6/3, 5 - 3/3 = (-8/3, -4/3, 0, 4)
HAND = {
    ("grpo", 2): [-0.70710678, 0.70710678, 0.0, 0.0],
    ("grpo", 4): [-0.92582010, -0.46291005, 0.0, 1.38873015, 0.0, 0.0, 0.0, 0.0],
    ("dr_grpo", 2): [-1.0, 1.0, 0.0, 0.0],
    ("dr_grpo", 4): [-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0],
    ("rloo", 2): [-2.0, 2.0, 0.0, 0.0],
    ("rloo", 4): [-8 / 3, -4 / 3, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0],
}
SCORES = {2: [1.0, 3.0, 0.1, 0.1], 4: [0.0, 1.0, 2.0, 5.0, 0.3, 0.3, 0.3, 0.3]}


@pytest.mark.parametrize("name,n", sorted(HAND))
def test_group_estimators_hand_values_ragged_masks(name, n):
    scores = torch.tensor(SCORES[n])
    mask = torch.cat([MASK4] * (len(scores) // 4))
    res = compute_advantages(name, AdvantageInputs(mask=mask, scores=scores, n_samples_per_prompt=n))
    assert res.returns is None and res.advantages.dtype == torch.float32 and res.advantages.shape == mask.shape
    got = _per_row(res.advantages, mask)
    assert got == pytest.approx(HAND[(name, n)], rel=1e-5, abs=1e-6)
    # the group of identical rewards: exactly zero, no NaN anywhere
    assert torch.isfinite(res.advantages).all()
    assert got[len(got) - n:] == [0.0] * n


def test_group_ids_override_and_mixed_group_sizes():
    # groups {0, 2} (scores 1, 3) and {1, 3, 4} (scores 4, 4, 7): rows interleaved
    scores = torch.tensor([1.0, 4.0, 3.0, 4.0, 7.0])
    mask = torch.ones(5, 2)
    ids = torch.tensor([10, 20, 10, 20, 20])
    rloo = compute_advantages("rloo", AdvantageInputs(mask=mask, scores=scores, group_ids=ids)).advantages
    # group B: 4 - (4 + 7)/2 = -1.5, 4 - 5.5 = -1.5, 7 - (4 + 4)/2 = 3
    assert rloo[:, 0].tolist() == pytest.approx([-2.0, -1.5, 2.0, -1.5, 3.0])
    dr = compute_advantages("dr_grpo", AdvantageInputs(mask=mask, scores=scores, group_ids=ids)).advantages
    assert dr[:, 0].tolist() == pytest.approx([-1.0, -1.0, 1.0, -1.0, 2.0])     # group B mean 5
    grpo = compute_advantages("grpo", AdvantageInputs(mask=mask, scores=scores, group_ids=ids, eps=1e-12)).advantages
    # group B: deviations (-1, -1, 2), std sqrt(6 / 2) = sqrt(3)
    s3 = math.sqrt(3.0)
    assert grpo[:, 0].tolist() == pytest.approx([-1 / math.sqrt(2), -1 / s3, 1 / math.sqrt(2), -1 / s3, 2 / s3],
                                                 rel=1e-6)


# REINFORCE++: row 0 rewards (0.1, -0.2, 1.0), row 1 (0.5, 2.0, pad NaN).
# gamma = 1: returns (0.9, 0.8, 1.0) and (2.5, 2.0); the five tokens: mean 7.2 / 5 = 1.44,
#   squared deviations 0.2916 + 0.4096 + 0.1936 + 1.1236 + 0.3136 = 2.332, var 2.332 / 4 = 0.583,
#   std 0.76354437 -> (-0.70722806, -0.83819622, -0.57625990, 1.38826249, 0.73342169)
# gamma = 0.5: returns (0.1 + 0.5 (-0.2 + 0.5 * 1.0), -0.2 + 0.5, 1.0) = (0.25, 0.3, 1.0) and
#   (0.5 + 0.5 * 2.0, 2.0) = (1.5, 2.0); mean 1.01, squared deviations sum 2.302, var 0.5755,
#   std 0.75861716 -> (-1.00182284, -0.93591344, -0.01318188, 0.64591209, 1.30500607)
@pytest.mark.parametrize("gamma,expected", [
    (1.0, [-0.70722806, -0.83819622, -0.57625990, 1.38826249, 0.73342169, 0.0]),
    (0.5, [-1.00182284, -0.93591344, -0.01318188, 0.64591209, 1.30500607, 0.0]),
])
def test_reinforce_pp_hand_values(gamma, expected):
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.5, 2.0, NAN]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    res = compute_advantages("reinforce_pp", AdvantageInputs(mask=mask, token_rewards=rewards, gamma=gamma))
    assert res.returns is None
    assert res.advantages.flatten().tolist() == pytest.approx(expected, abs=2e-6)


def test_gae_estimator_hand_values_and_equals_two_gae_calls():
    # lam_actor = 0: one-step TD errors (0.1 + 0.3 - 0.5, -0.2 + 0.2 - 0.3, 1.0 + 0 - 0.2)
    # lam_critic = 1 (gamma 1): returns = reward-to-go (0.9, 0.8, 1.0)
    rewards = torch.tensor([[0.1, -0.2, 1.0, NAN]])
    values = torch.tensor([[0.5, 0.3, 0.2, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    res = compute_advantages("gae", AdvantageInputs(mask=mask, token_rewards=rewards, values=values,
                                                    gamma=1.0, lam_actor=0.0, lam_critic=1.0))
    assert res.advantages.tolist()[0] == pytest.approx([-0.1, -0.3, 0.8, 0.0], abs=1e-6)
    assert res.returns.tolist()[0] == pytest.approx([0.9, 0.8, 1.0, 0.0], abs=1e-6)
    g = torch.Generator().manual_seed(3)
    r, v = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    m = (torch.arange(9)[None] < torch.tensor([1, 9, 4, 5, 2, 7])[:, None]).float()
    res = compute_advantages("gae", AdvantageInputs(mask=m, token_rewards=r, values=v, gamma=0.99,
                                                    lam_actor=0.95, lam_critic=1.0))
    assert torch.equal(res.advantages, algo.gae(r, v, m, 0.99, 0.95)[0])
    assert torch.equal(res.returns, algo.gae(r, v, m, 0.99, 1.0)[1])


def test_loss_num_tokens():
    assert algo.loss_num_tokens("token_mean", 123, 8, 50) == 123.0
    assert algo.loss_num_tokens("token_sum_norm", 123, 8, 50) == 400.0
    with pytest.raises(ValueError, match="seq_mean"):
        algo.loss_num_tokens("seq_mean", 1, 1, 1)


BAD = [
    ("grpo", dict(scores=torch.ones(4), n_samples_per_prompt=1), r"n_samples_per_prompt must be >= 2, got 1"),
    ("rloo", dict(scores=torch.ones(4), n_samples_per_prompt=3), r"batch 4 is not a whole number of groups"),
    ("rloo", dict(scores=torch.ones(4), group_ids=torch.tensor([0, 0, 0, 1])), r"group sizes \[1, 3\]"),
    ("dr_grpo", dict(scores=torch.ones(4), group_ids=torch.zeros(4)), r"integer \[B\]=4"),
    ("grpo", dict(scores=torch.ones(3), n_samples_per_prompt=2), r"scores has shape \(3,\), expected \(4,\)"),
    ("grpo", dict(scores=torch.tensor([1.0, NAN, 0, 0]), n_samples_per_prompt=2), "NaN or inf"),
    ("grpo", dict(scores=torch.ones(4), n_samples_per_prompt=2, eps=0.0), "eps must be > 0"),
    ("grpo", dict(n_samples_per_prompt=2), r"'grpo' needs scores"),
    ("gae", dict(token_rewards=torch.zeros(4, 3)), r"'gae' needs values"),
    ("gae", dict(token_rewards=torch.zeros(4, 3), values=torch.zeros(4, 2)), r"values has shape \(4, 2\)"),
    ("reinforce_pp", dict(scores=torch.ones(4)), r"needs token_rewards"),
]


@pytest.mark.parametrize("name,kwargs,match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_raise_one_clear_error(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_advantages(name, AdvantageInputs(mask=MASK4, **kwargs))
