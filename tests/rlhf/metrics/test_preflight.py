"""Pre-flight length-bias check: hand-computed correlations, gaps and the readable line."""

from __future__ import annotations

import math

import pytest

from rlhf.metrics.preflight import (CORR, GAP, GAP_STD, LONG_FRAC, NUM, SPEARMAN, THRESHOLD, average_ranks,
                                    bucket_mean_key, preflight_length_bias, preflight_line)


def test_reward_that_prefers_short_responses():
    # lengths 10..40, scores 4..1: perfectly anti-correlated. median 25 -> long = {30, 40}:
    # mean 1.5 vs short 3.5, gap -2; population std of (4,3,2,1) = sqrt(1.25) -> gap -2/1.1180 = -1.7889 std
    m = preflight_length_bias([10, 20, 30, 40], [4, 3, 2, 1], bucket_width=10, num_buckets=20)
    assert m[CORR] == pytest.approx(-1.0) and m[SPEARMAN] == pytest.approx(-1.0)
    assert m[THRESHOLD] == 25.0 and m[LONG_FRAC] == 0.5 and m[NUM] == 4
    assert m[GAP] == pytest.approx(-2.0)
    assert m[GAP_STD] == pytest.approx(-2.0 / math.sqrt(1.25))
    assert [m[bucket_mean_key(i)] for i in (1, 2, 3, 4)] == [4, 3, 2, 1]
    assert bucket_mean_key(0) not in m                     # an empty bucket has no mean
    line = preflight_line(m)
    assert "responses over 25 tokens 1.79 std below shorter ones" in line
    assert "Pearson r = -1.00" in line and "4 responses" in line


def test_ties_and_configured_threshold():
    # lengths (5, 5, 10, 20), scores (1, 2, 4, 3)
    # Pearson: dx = (-5,-5,0,10), dy = (-1.5,-.5,1.5,.5): 15 / sqrt(150 * 5) = 0.547723
    # Spearman: length ranks (1.5,1.5,3,4), score ranks (1,2,4,3): 3.5 / sqrt(4.5 * 5) = 0.737865
    lengths, scores = [5, 5, 10, 20], [1, 2, 4, 3]
    assert list(average_ranks(lengths)) == [1.5, 1.5, 3, 4]
    m = preflight_length_bias(lengths, scores, bucket_width=10, num_buckets=2)
    assert m[CORR] == pytest.approx(0.547723, abs=1e-6)
    assert m[SPEARMAN] == pytest.approx(0.737865, abs=1e-6)
    assert m[THRESHOLD] == 7.5 and m[GAP] == pytest.approx(2.0)          # long (10, 20): 3.5 vs 1.5
    assert m[bucket_mean_key(0)] == 1.5 and m[bucket_mean_key(1)] == 3.5  # the last bucket is open-ended
    assert "1.79 std above shorter ones" in preflight_line(m)
    t = preflight_length_bias(lengths, scores, long_tokens=15)            # long = (20): 3 vs 7/3
    assert t[THRESHOLD] == 15 and t[LONG_FRAC] == 0.25
    assert t[GAP] == pytest.approx(2 / 3) and t[GAP_STD] == pytest.approx((2 / 3) / math.sqrt(1.25))
    assert t[CORR] == m[CORR]                                             # the threshold moves only the gap


def test_most_responses_at_the_cap_split_below_the_median():
    # lengths (5, 9, 32, 32, 32): median 32 is the longest, so long = the three at the cap (> 9 tokens):
    # scores 0 vs short (2, 1) mean 1.5 -> gap -1.5; population std of (2, 1, 0, 0, 0) = sqrt(3.2 / 5) = 0.8
    m = preflight_length_bias([5, 9, 32, 32, 32], [2, 1, 0, 0, 0])
    assert m[THRESHOLD] == 9 and m[LONG_FRAC] == pytest.approx(0.6)
    assert m[GAP] == pytest.approx(-1.5) and m[GAP_STD] == pytest.approx(-1.875)
    assert "over 9 tokens 1.88 std below" in preflight_line(m)


@pytest.mark.parametrize("lengths, scores", [([7, 7, 7], [1.0, 2.0, 3.0]),     # no length variation
                                             ([3, 9, 12], [0.5, 0.5, 0.5])])   # a constant reward
def test_undefined_values_are_nan_and_the_line_says_so(lengths, scores):
    m = preflight_length_bias(lengths, scores)
    assert math.isnan(m[CORR]) and math.isnan(m[GAP_STD])
    assert "not measurable" in preflight_line(m)
    assert "not measurable" in preflight_line({k: (None if isinstance(v, float) and math.isnan(v) else v)
                                               for k, v in m.items()})      # as read back from JSONL (null)


def test_line_empty_without_preflight_metrics():
    assert preflight_line({"reward/mean": 1.0}) == ""


@pytest.mark.parametrize("lengths, scores, kw, match", [
    ([1, 2], [1.0], {}, "must be one non-empty"),
    ([], [], {}, "must be one non-empty"),
    ([1, 2], [1.0, float("nan")], {}, "finite"),
    ([1, 2], [1.0, 2.0], {"long_tokens": -1}, "long_tokens"),
])
def test_bad_inputs(lengths, scores, kw, match):
    with pytest.raises(ValueError, match=match):
        preflight_length_bias(lengths, scores, **kw)
