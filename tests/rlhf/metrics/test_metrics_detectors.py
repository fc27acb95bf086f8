"""Detectors on synthetic curves with known onsets, plus curves that must not trigger."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlhf.metrics import (StabilityConfig, StabilityMonitor, bucket_key, detect_hockey_stick,
                          detect_length_collapse, detect_run, rolling_median)

STEPS = np.arange(300)
SEEDS = range(20)


def _length_curve(seed, drop_at=20, to=0.4, recover_at=None, noise=0.03, base=1000.0):
    rng = np.random.default_rng(seed)
    level = np.where(STEPS < drop_at, 1.0, to)
    if recover_at is not None:
        level = np.where(STEPS >= recover_at, 1.0, level)
    return base * level * (1 + rng.normal(0, noise, STEPS.size))


def _hockey_curve(seed, noise=0.05):
    """Flat 0 until step 10, down to -1 by 25, plateau to 55, linear recovery to +0.5 at 155."""
    rng = np.random.default_rng(seed)
    r = np.interp(STEPS, [0, 10, 25, 55, 155, 299], [0, 0, -1, -1, 0.5, 0.5])
    return r + rng.normal(0, noise, STEPS.size)


def test_rolling_median_is_causal_and_drops_single_spikes():
    v = np.array([1.0, 1.0, 1.0, 100.0, 1.0, 1.0, 5.0, 5.0, 5.0])
    sm = rolling_median(v, 5)
    assert sm[3] == 1.0 and sm[4] == 1.0
    assert rolling_median(v[:7], 5).tolist() == sm[:7].tolist()      # no look-ahead
    assert sm[-1] == 5.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_length_collapse_persistent(seed):
    v = detect_length_collapse(STEPS, _length_curve(seed))
    assert v.verdict == "collapsed"
    assert 20 <= v.onset_step <= 25                           # known onset + smoothing/persistence lag
    assert 0.3 < v.depth < 0.45 and v.min_step >= 20 and v.recovery_step is None
    assert v.baseline == pytest.approx(1000, rel=0.05)


def test_length_collapse_recovered():
    v = detect_length_collapse(STEPS, _length_curve(0, recover_at=100))
    assert v.verdict == "recovered" and 20 <= v.onset_step <= 25 and 100 <= v.recovery_step <= 106
    assert 20 <= v.min_step < 100


@pytest.mark.parametrize("name", ["noisy_flat", "slow_drift", "one_step_spike", "two_step_spike", "late_drop"])
def test_length_collapse_must_not_trigger(name):
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        flat = 1000 * (1 + rng.normal(0, 0.1, STEPS.size))
        curve = {
            "noisy_flat": flat,
            "slow_drift": flat * np.linspace(1.0, 0.75, STEPS.size),     # -25% over the whole run
            "one_step_spike": np.where(STEPS == 50, 50.0, flat),
            "two_step_spike": np.where((STEPS == 50) | (STEPS == 51), 50.0, flat),
            "late_drop": np.where(STEPS >= 250, 300.0, flat),             # after the early window
        }[name]
        v = detect_length_collapse(STEPS, curve, StabilityConfig(early_steps=200))
        assert v.verdict == "none", (name, seed, v)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hockey_stick_phases_and_numbers(seed):
    v = detect_hockey_stick(STEPS, _hockey_curve(seed), scale=1.0)
    assert v.verdict == "hockey_stick" and v.phase == "recovered"
    assert 12 <= v.onset_step <= 20
    assert 25 <= v.trough_step <= 58 and v.drop_depth == pytest.approx(1.0, abs=0.15)
    assert v.trough_length >= 30
    assert 85 <= v.half_recovery_step <= 95 and 118 <= v.recovery_step <= 128
    assert v.recovery_slope > 0


def test_hockey_stick_v_shape_and_monotone_decline():
    rng = np.random.default_rng(0)
    v_curve = np.interp(STEPS, [0, 20, 24, 28, 299], [0, 0, -1.5, 0, 0]) + rng.normal(0, 0.02, STEPS.size)
    v = detect_hockey_stick(STEPS, v_curve, scale=1.0)
    assert v.verdict == "v_shape" and 20 <= v.trough_step <= 28 and v.recovery_step is not None
    mono = np.interp(STEPS, [0, 10, 299], [0, 0, -2.0]) + rng.normal(0, 0.02, STEPS.size)
    m = detect_hockey_stick(STEPS, mono, scale=1.0)
    assert m.verdict == "monotone_decline" and m.half_recovery_step is None and m.trough_step >= 290
    dropped_and_stuck = np.interp(STEPS, [0, 10, 20, 299], [0, 0, -1, -1]) + rng.normal(0, 0.02, STEPS.size)
    s = detect_hockey_stick(STEPS, dropped_and_stuck, scale=1.0)
    assert s.verdict == "monotone_decline" and s.phase == "trough"


LONG = np.arange(400)


def _v(arm, depth=1.5, start=20, noise=0.05, seed=0):
    """A linear V: flat, down to -depth over ``arm`` steps, back up over ``arm`` steps, flat."""
    rng = np.random.default_rng(seed)
    return np.interp(LONG, [0, start, start + arm, start + 2 * arm, 399], [0, 0, -depth, 0, 0]) \
        + rng.normal(0, noise, LONG.size)


def _stick(decline, plateau, recovery, noise=0.05, seed=0):
    """Down to -1 over ``decline`` steps, flat for ``plateau``, slow recovery over ``recovery``."""
    rng = np.random.default_rng(seed)
    t = np.cumsum([10, decline, plateau, recovery])
    return np.interp(LONG, [0, *t, 399], [0, 0, -1, -1, 0.25, 0.25]) + rng.normal(0, noise, LONG.size)


@pytest.mark.parametrize("arm", [4, 10, 20, 40])
@pytest.mark.parametrize("scale", [1.0, None])
def test_v_shape_at_every_arm_length(arm, scale):
    """The V / hockey-stick boundary scales with the decline: a V is a V at any arm length
    (the old fixed bounds called arms > ~10 steps a hockey stick)."""
    for seed in range(10):
        v = detect_hockey_stick(LONG, _v(arm, seed=seed), scale=scale)
        assert v.verdict == "v_shape", (arm, seed, v)
        assert 20 <= v.trough_step <= 20 + arm + 5 and v.recovery_step is not None
        # decline length ~ arm / 2 (between 25% and 75% of the depth), plateau about the same
        assert abs(v.decline_length - arm / 2) <= max(3, arm / 4), v
        assert v.trough_length < max(5, 2 * v.decline_length), v


@pytest.mark.parametrize("decline,plateau,recovery", [(3, 20, 60), (10, 40, 100), (10, 80, 40), (20, 40, 100),
                                                      (20, 80, 150), (40, 80, 100)])
def test_hockey_stick_with_long_plateau(decline, plateau, recovery):
    for seed in range(10):
        v = detect_hockey_stick(LONG, _stick(decline, plateau, recovery, seed=seed), scale=1.0)
        assert v.verdict == "hockey_stick", (decline, plateau, recovery, seed, v)
        assert v.trough_length >= plateau and v.trough_length > 2 * v.decline_length


def test_noisier_v_and_hockey_stick():
    """Noise at a tenth of the depth: long-armed Vs stay V-shapes, long plateaus hockey sticks
    (measured over 20 seeds: arms 20 -> 19/20 V, 40 -> 20/20; sticks 19-20/20. Short arms in
    this much noise are ambiguous: arm 10 -> 15/20 V)."""
    for seed in range(10):
        for arm in (20, 40):
            v = detect_hockey_stick(LONG, _v(arm, depth=1.0, noise=0.1, seed=seed), scale=1.0)
            assert v.verdict == "v_shape", (arm, seed, v)
        for args in [(3, 20, 60), (10, 40, 100), (20, 40, 100)]:
            h = detect_hockey_stick(LONG, _stick(*args, noise=0.1, seed=seed), scale=1.0)
            assert h.verdict == "hockey_stick", (args, seed, h)


def test_v_shape_boundary_thresholds_are_config():
    curve = _v(20, seed=0)
    assert detect_hockey_stick(LONG, curve, scale=1.0).verdict == "v_shape"
    strict = StabilityConfig(v_plateau_ratio=0.5, plateau_min_steps=2)
    assert detect_hockey_stick(LONG, curve, strict, scale=1.0).verdict == "hockey_stick"
    with pytest.raises(ValueError, match="metrics.v_plateau_ratio"):
        StabilityConfig.from_dict({"v_plateau_ratio": 0})


@pytest.mark.parametrize("name", ["noisy_flat", "slow_rise", "slow_decline", "one_step_spike", "noise_no_scale"])
def test_hockey_stick_must_not_trigger(name):
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        noise = rng.normal(0, 0.05, STEPS.size)
        curve, scale = {
            "noisy_flat": (noise, 1.0),
            "slow_rise": (noise + np.linspace(0, 1, STEPS.size), 1.0),
            "slow_decline": (noise - np.linspace(0, 0.2, STEPS.size), 1.0),   # -0.13 sigma by step 200
            "one_step_spike": (np.where(STEPS == 40, -5.0, noise), 1.0),
            "noise_no_scale": (noise, None),                                  # z in units of step noise
        }[name]
        v = detect_hockey_stick(STEPS, curve, scale=scale)
        assert v.verdict == "no_drop" and v.phase == "baseline", (name, seed, v)


def test_hockey_stick_invariant_to_affine_reward_rescaling():
    curve = _hockey_curve(4)
    a = detect_hockey_stick(STEPS, curve, scale=1.0)
    b = detect_hockey_stick(STEPS, 10 * curve + 3, scale=10.0)
    for k in ("verdict", "onset_step", "trough_step", "trough_length", "half_recovery_step", "recovery_step"):
        assert getattr(a, k) == getattr(b, k), k
    assert b.drop_depth == pytest.approx(a.drop_depth) and b.recovery_slope == pytest.approx(10 * a.recovery_slope)


def _records(seed=0):
    rng = np.random.default_rng(seed)
    length = _length_curve(seed)
    reward = _hockey_curve(seed)
    flat = rng.normal(0.5, 0.05, STEPS.size)
    recs = []
    for i, st in enumerate(STEPS):
        r = {"step": int(st), "rollout/length_mean": length[i], "reward/mean": reward[i], "reward/std": 1.0,
             bucket_key(3, "mean"): reward[i], bucket_key(3, "count"): 50.0,
             bucket_key(5, "mean"): flat[i], bucket_key(5, "count"): 40.0 if i % 7 else 2.0}
        recs.append(r)
    return recs


def test_online_monitor_equals_offline_and_logs_changes_only():
    recs = _records()
    mon = StabilityMonitor({"early_steps": 200})
    outs, phases = [], []
    for r in recs:
        out = mon.update(r["step"], r)
        outs.append(out)
        phases.append(out["stability/hockey_stick_phase"])
    off = detect_run(recs, StabilityConfig(early_steps=200))
    assert off["length_collapse"].verdict == "collapsed" and off["hockey_stick"].verdict == "hockey_stick"
    assert off["buckets"][3].verdict == "hockey_stick" and off["buckets"][5].verdict == "no_drop"
    assert outs[-1]["stability/length_collapse"] == 1.0
    assert outs[-1]["stability/hockey_stick_class"] == 2.0 and outs[-1]["stability/bucket_03_hockey_stick_phase"] == 4
    # phases only move forward: baseline -> decline -> trough -> recovering -> recovered
    assert phases == sorted(phases) and set(phases) == {0.0, 1.0, 2.0, 3.0, 4.0}
    # the online verdict at the end is the offline verdict (same evidence)
    last = [e for e in mon.events if e["detector"] == "hockey_stick"][-1]
    assert last["evidence"]["trough_step"] == off["hockey_stick"].trough_step
    lc = [e for e in mon.events if e["detector"] == "length_collapse"]
    assert [e["to"] for e in lc] == ["none", "collapsed"] and lc[1]["step"] == off["length_collapse"].onset_step + 2
    # bucket 5 skips low-count steps; each event is a real change
    assert all(e["from"] != e["to"] for e in mon.events)
    assert all(e["detector"] != "hockey_stick/bucket_05" or e["to"] == "no_drop/baseline" for e in mon.events)
    assert "stability/bucket_05_hockey_stick_phase" not in outs[7]


def test_monitor_state_dict_resumes_exactly():
    recs = _records(1)
    full = StabilityMonitor()
    expected = [full.update(r["step"], r) for r in recs]
    first = StabilityMonitor()
    for r in recs[:120]:
        first.update(r["step"], r)
    resumed = StabilityMonitor()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got = [resumed.update(r["step"], r) for r in recs[120:]]
    assert got == expected[120:]
    assert resumed.events == full.events
    with pytest.raises(ValueError, match="not after"):
        resumed.update(5, recs[5])


def test_config_from_dict_names_bad_keys():
    with pytest.raises(ValueError, match="metrics.colapse_fraction"):
        StabilityConfig.from_dict({"colapse_fraction": 0.4})
    with pytest.raises(ValueError, match="metrics.collapse_fraction"):
        StabilityConfig.from_dict({"collapse_fraction": 0.95})
    assert StabilityConfig.from_dict({"bucket_width": 50}).bucket_width == 50
    for key, bad in [("bucket_width", 0), ("num_buckets", 101), ("plateau_tol", 0.5), ("drop_z", -1.0),
                     ("smooth_window", 0), ("collapse_fraction", float("nan")), ("num_buckets", "ten")]:
        with pytest.raises(ValueError, match=f"metrics.{key}"):
            StabilityConfig.from_dict({key: bad})


def test_bucket_labels():
    cfg = StabilityConfig(bucket_width=7, num_buckets=5)
    assert cfg.bucket_label(0) == "length [0, 7)" and cfg.bucket_label(3) == "length [21, 28)"
    assert cfg.bucket_label(4) == "length >= 28"


def test_every_metrics_field_has_a_range():
    import dataclasses

    from bairlhf.typed_config import field_ranges

    ranges = field_ranges(StabilityConfig, "metrics")
    assert set(ranges) == {f"metrics.{f.name}" for f in dataclasses.fields(StabilityConfig)}
    assert ranges["metrics.num_buckets"] == "[1, 100]" and ranges["metrics.plateau_tol"] == "(0, 0.5)"
