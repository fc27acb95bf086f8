"""Per-step batch metrics against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf import metrics


def _mask(lengths, T, left=False):
    m = torch.zeros(len(lengths), T)
    for i, n in enumerate(lengths):
        if left:
            m[i, T - n:] = 1
        else:
            m[i, :n] = 1
    return m


def test_length_bucket_stats_width_count_and_open_last_bucket():
    lengths = torch.tensor([0, 99, 100, 250, 1999, 2000, 5000])
    scores = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0])
    out = metrics.length_bucket_stats(lengths, scores)            # 100 x 20, last open-ended
    assert out["reward/bucket_00_count"] == 2 and out["reward/bucket_00_mean"] == 2.0
    assert out["reward/bucket_01_count"] == 1 and out["reward/bucket_01_mean"] == 5.0
    assert out["reward/bucket_02_mean"] == 7.0
    assert out["reward/bucket_19_count"] == 3 and out["reward/bucket_19_mean"] == 11.0
    assert out["reward/bucket_05_count"] == 0 and "reward/bucket_05_mean" not in out
    assert sum(v for k, v in out.items() if k.endswith("_count")) == 7
    assert len([k for k in out if k.endswith("_count")]) == 20
    small = metrics.length_bucket_stats(lengths, scores, width=1000, num_buckets=3)
    assert small["reward/bucket_00_count"] == 4 and small["reward/bucket_01_count"] == 1
    assert small["reward/bucket_02_count"] == 2 and small["reward/bucket_02_mean"] == 12.0
    with pytest.raises(ValueError, match="width"):
        metrics.length_bucket_stats(lengths, scores, width=0)


@pytest.mark.parametrize("left", [False, True])
def test_batch_metrics_hand_values(left):
    lengths = [2, 4, 3, 1]
    mask = _mask(lengths, 4, left)
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    finished = torch.tensor([True, False, True, True])
    logp = torch.log(torch.full((4, 4), 0.5))
    out = metrics.batch_metrics(mask=mask, scores=scores, finished=finished, old_logp=logp, ref_logp=logp,
                                rollout_logp=logp, values=torch.ones(4, 4), returns=torch.ones(4, 4) * 2,
                                advantages=torch.ones(4, 4), bucket_width=2, num_buckets=2)
    assert out["rollout/length_mean"] == 2.5
    assert out["rollout/length_std"] == pytest.approx(math.sqrt(1.25))
    assert (out["rollout/length_min"], out["rollout/length_max"]) == (1.0, 4.0)
    assert out["rollout/clip_ratio"] == 0.25
    assert out["rollout/terminated_length_mean"] == 2.0
    assert out["rollout/num_tokens"] == 10 and out["rollout/num_responses"] == 4
    assert out["reward/mean"] == 3.0 and out["reward/std"] == pytest.approx(math.sqrt(3.5))
    assert out["reward/bucket_00_count"] == 1 and out["reward/bucket_00_mean"] == 6.0
    assert out["reward/bucket_01_count"] == 3 and out["reward/bucket_01_mean"] == 2.0
    assert out["rollout/nll"] == pytest.approx(math.log(2))
    for k in ("kl/to_reference", "kl/to_reference_k1", "kl/to_reference_seq", "kl/rollout_vs_trainer",
              "kl/rollout_vs_trainer_max_abs"):
        assert out[k] == 0.0, k
    assert math.isnan(out["critic/explained_var"])             # constant returns
    assert out["return/mean"] == 2.0 and out["advantage/std"] == 0.0


def test_batch_metrics_takes_the_typed_metrics_config():
    """The run's ``metrics:`` section decides the buckets (width 7, 5 buckets, the last open)."""
    cfg = metrics.StabilityConfig.from_dict({"bucket_width": 7, "num_buckets": 5})
    lengths = [1, 7, 13, 27, 28, 40]
    mask = _mask(lengths, 40)
    out = metrics.batch_metrics(mask=mask, scores=torch.arange(6.0), finished=torch.ones(6, dtype=torch.bool),
                                config=cfg)
    counts = {k: v for k, v in out.items() if k.endswith("_count")}
    assert counts == {"reward/bucket_00_count": 1, "reward/bucket_01_count": 2, "reward/bucket_02_count": 0,
                      "reward/bucket_03_count": 1, "reward/bucket_04_count": 2}
    assert out["reward/bucket_04_mean"] == 4.5 and "reward/bucket_02_mean" not in out


def test_kl_and_mismatch_metrics():
    mask = _mask([2, 1], 2)
    old = torch.tensor([[-1.0, -2.0], [-0.5, float("nan")]])
    ref = torch.tensor([[-1.5, -1.0], [-0.5, 0.0]])
    roll = torch.tensor([[-1.0, -2.1], [-0.3, 0.0]])
    out = metrics.batch_metrics(mask=mask, scores=torch.zeros(2), finished=torch.ones(2, dtype=torch.bool),
                                old_logp=old, ref_logp=ref, rollout_logp=roll)
    k3 = lambda x: math.exp(-x) - 1 + x  # noqa: E731
    assert out["kl/to_reference"] == pytest.approx((k3(0.5) + k3(-1.0) + 0) / 3)
    assert out["kl/to_reference_k1"] == pytest.approx((0.5 - 1.0) / 3)
    assert out["kl/to_reference_seq"] == pytest.approx((k3(0.5) + k3(-1.0)) / 2)
    assert out["kl/rollout_vs_trainer"] == pytest.approx((0 + k3(-0.1) + k3(0.2)) / 3)
    assert out["kl/rollout_vs_trainer_max_abs"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="ref_logp"):
        metrics.batch_metrics(mask=mask, scores=torch.zeros(2), finished=torch.ones(2, dtype=torch.bool),
                              old_logp=old, ref_logp=ref[:, :1])


def test_explained_variance():
    mask = _mask([3, 2], 3)
    ret = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    assert metrics.explained_variance(ret, ret, mask) == pytest.approx(1.0)
    const = torch.full_like(ret, 3.0)
    assert metrics.explained_variance(const, ret, mask) == pytest.approx(0.0)
    assert metrics.explained_variance(ret + 1.0, ret, mask) == pytest.approx(1.0)   # constant offset


def test_reduce_update_stats_token_weighted():
    stats = [{"clipfrac": torch.tensor(0.5), "approx_kl": 0.1, "ratio_max": 1.3, "tokens": 10.0, "other": 9},
             {"clipfrac": 0.0, "approx_kl": 0.4, "ratio_max": 1.7, "tokens": 30.0}]
    out = metrics.reduce_update_stats(stats, metrics.ACTOR_STAT_NAMES)
    assert out["actor/clipfrac"] == pytest.approx(0.125)
    assert out["kl/policy_vs_sampling"] == pytest.approx((0.1 * 10 + 0.4 * 30) / 40)
    assert out["actor/ratio_max"] == 1.7
    assert set(out) == {"actor/clipfrac", "kl/policy_vs_sampling", "actor/ratio_max"}


def test_every_metric_name_is_in_the_readme_table():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    section = readme[readme.index("## Metrics"):readme.index("## Reports")]
    documented = {n for row in re.findall(r"^\| (.*?) \|", section, re.M) for n in re.findall(r"`([^`]+)`", row)}
    mask = _mask([3, 1], 3)
    t = torch.zeros(2, 3)
    names = set(metrics.batch_metrics(mask=mask, scores=torch.zeros(2), finished=torch.ones(2, dtype=torch.bool),
                                      old_logp=t, ref_logp=t, rollout_logp=t, values=t, returns=t, advantages=t))
    names |= set(metrics.ACTOR_STAT_NAMES.values()) | set(metrics.CRITIC_STAT_NAMES.values())
    mon = metrics.StabilityMonitor()
    for step in range(4):
        names |= set(mon.update(step, {"rollout/length_mean": 5.0, "reward/mean": 0.0, "reward/std": 1.0,
                                       "reward/bucket_03_mean": 1.0, "reward/bucket_03_count": 9.0}))
    missing = sorted({re.sub(r"bucket_\d\d", "bucket_XX", n) for n in names} - documented)
    assert not missing, f"README '## Metrics' lacks {missing}"


def test_length_bias_by_hand():
    """Scores 4, 3, 2, 1 at lengths 1..4: correlation -1; short (<= median 2.5: lengths 1, 2) mean 3.5,
    long mean 1.5, score std sqrt(1.25): gap 2 / 1.1180 = 1.7889. Constant scores: NaN gap."""
    import math

    from rlhf.metrics.batch import length_bias

    out = length_bias(torch.tensor([1, 2, 3, 4]), torch.tensor([4.0, 3.0, 2.0, 1.0]))
    assert out["reward/length_corr"] == pytest.approx(-1.0)
    assert out["reward/short_minus_long"] == pytest.approx(2.0 / math.sqrt(1.25))
    flat = length_bias(torch.tensor([1, 2, 3, 4]), torch.ones(4))
    assert math.isnan(flat["reward/length_corr"]) and math.isnan(flat["reward/short_minus_long"])
