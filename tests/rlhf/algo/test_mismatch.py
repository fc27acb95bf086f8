"""Masked importance sampling (``mismatch_keep_mask``) and the rollout/trainer ratio quantiles,
against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.algo import mismatch_keep_mask
from rlhf.metrics import batch_metrics


def test_keep_mask_rejects_sequences_over_the_threshold():
    trainer = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-1.0, -1.0, 0.0]])
    rollout = torch.tensor([[0.0, 0.0, 9.0], [0.5, 0.0, 0.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0]])
    # row 0: identical on its 2 tokens (the 9.0 sits on padding) -> k3 0, kept
    # row 1: x = 0.5 on one token of 3 -> mean k3 = (exp(-0.5) - 1 + 0.5) / 3 = 0.0355..., rejected at 0.03
    # row 2: identical -> kept
    keep = mismatch_keep_mask(trainer, rollout, mask, threshold=0.03)
    assert keep.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]
    want = (math.exp(-0.5) - 0.5) / 3
    assert mismatch_keep_mask(trainer, rollout, mask, threshold=want + 1e-6)[1].tolist() == [1.0, 1.0, 1.0]


def test_keep_mask_checks_shapes():
    with pytest.raises(ValueError, match="must share one shape"):
        mismatch_keep_mask(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 0.1)


def test_ratio_quantiles_of_trainer_over_rollout():
    mask = torch.ones(1, 4)
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    rollout = torch.tensor([[0.0, 0.0, 0.0, math.log(2.0)]])  # ratios exp(old - rollout): 1, 1, 1, 0.5
    m = batch_metrics(mask=mask, scores=torch.zeros(1), finished=torch.ones(1, dtype=torch.bool),
                      old_logp=old, rollout_logp=rollout)
    assert m["kl/rollout_vs_trainer_ratio_p50"] == pytest.approx(1.0)
    # linear interpolation between the sorted ratios [0.5, 1, 1, 1] at 1% -> 0.5 + 0.03 * 0.5
    assert m["kl/rollout_vs_trainer_ratio_p01"] == pytest.approx(0.515)
    assert m["kl/rollout_vs_trainer_ratio_p99"] == pytest.approx(1.0)
    assert m["kl/rollout_vs_trainer_max_abs"] == pytest.approx(math.log(2.0))
