"""Early warnings (``rlhf.metrics.warning``): hand-computed cases, synthetic positives with a known
lead time, synthetic negatives that must stay quiet, and online == offline."""

from __future__ import annotations

import numpy as np
import pytest

from rlhf.metrics import StabilityConfig, StabilityMonitor
from rlhf.metrics.detectors import LENGTH_KEY, REWARD_KEY, REWARD_STD_KEY, detect_run
from rlhf.metrics.warning import ADV_CORR_KEY, LENGTH_CORR_KEY, collapse_warning, hockey_stick_warning, lead_time

STEPS = np.arange(300)
SEEDS = range(20)
HAND = StabilityConfig(smooth_window=1, baseline_steps=3, warn_persistence=2, warn_length_fraction=0.85,
                       warn_reward_corr=1.0)   # the length path alone (the reward-preference path off)


def _series(lengths, corr, steps=None):
    steps = list(range(len(lengths))) if steps is None else list(steps)
    corr = np.broadcast_to(corr, len(steps))
    return {LENGTH_KEY: (steps, list(lengths)), LENGTH_CORR_KEY: (steps, list(corr))}


def test_collapse_warning_by_hand():
    """Baseline 100 (median of the first 3); lengths <= 85 from step 4 (80); with persistence 2 the
    warning is raised at step 5; the raw length first drops below 50 at step 8: lead time 3."""
    lengths = [100, 100, 100, 90, 80, 70, 60, 50, 40]
    HAND_BIAS = -0.5
    v = collapse_warning(_series(lengths, HAND_BIAS), HAND)
    assert (v.state, v.step, v.indicator, v.length_ratio) == ("warned", 5, -0.5, 0.7)
    assert lead_time(range(9), lengths, v.step, HAND) == 3
    assert collapse_warning(_series(lengths, -0.15), HAND).state == "quiet"   # weaker than warn_bias_corr 0.2
    assert collapse_warning(_series(lengths, 0.3), HAND).state == "quiet"
    assert collapse_warning({LENGTH_KEY: (range(9), lengths)}, HAND).state == "quiet"  # indicator missing
    assert lead_time(range(9), [100] * 9, 5, HAND) is None


def test_collapse_warning_reward_preference_path_by_hand():
    """Second path: the score-length correlation (here also the bias indicator) <= -0.3 for 2 steps
    warns before the length moves: -0.5 from step 0 -> raised at step 1 (no baseline needed yet, so
    no length ratio); -0.25 is weaker than warn_reward_corr 0.3, so only the length path can fire
    (step 5, as above); an advantage-length correlation that does not follow the reward (-0.1)
    stops it."""
    lengths = [100, 100, 100, 90, 80, 70, 60, 50, 40]
    cfg = StabilityConfig(smooth_window=1, baseline_steps=3, warn_persistence=2, warn_length_fraction=0.85)
    v = collapse_warning(_series(lengths, -0.5), cfg)
    assert (v.state, v.step, v.indicator, v.length_ratio) == ("warned", 1, -0.5, None)
    assert collapse_warning(_series(lengths, -0.25), cfg).step == 5
    series = _series([100] * 9, -0.5)
    assert collapse_warning(series, cfg).step == 1      # lengths holding still: this path alone
    series[ADV_CORR_KEY] = (list(range(9)), [-0.1] * 9)
    assert collapse_warning(series, cfg).state == "quiet"


def _declining(seed, start=20, over=20, to=0.3, noise=0.03):
    """Flat, then a linear decline to ``to`` of the start over ``over`` steps (a collapse that builds up)."""
    rng = np.random.default_rng(seed)
    level = np.interp(STEPS, [0, start, start + over, 299], [1, 1, to, to])
    return 1000 * level * (1 + rng.normal(0, noise, STEPS.size))


@pytest.mark.parametrize("over", [10, 20, 40])
def test_warning_leads_a_building_collapse(over):
    """A collapse that builds over 10-40 steps under a length-biased update (batch correlation
    -0.4 +- 0.125, the sampling noise of 64 responses; lengths +- 5%) is warned about at least 3
    steps before the raw length halves in every seed, and so is one that completes within 10 steps."""
    leads = []
    for seed in SEEDS:
        rng = np.random.default_rng(100 + seed)
        lengths = _declining(seed, over=over, noise=0.05)
        v = collapse_warning(_series(lengths, -0.4 + rng.normal(0, 0.125, STEPS.size), STEPS))
        assert v.state == "warned", (over, seed)
        leads.append(lead_time(STEPS, lengths, v.step))
    assert min(leads) >= 3, (over, leads)


@pytest.mark.parametrize("name", ["noisy_flat", "slow_drift", "one_step_spike", "two_step_spike", "late_drop",
                                  "drift_under_unbiased_reward"])
def test_collapse_warning_must_not_trigger(name):
    """The detector suite's negative length curves (no collapse, lengths +- 10%) and a real decline,
    under an unbiased update (correlation 0 +- 0.125). Not a negative here: a biased update whose
    length holds within +- 5% (it warns in 6/20 seeds once the length dips 10% two steps running)."""
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        flat = 1000 * (1 + rng.normal(0, 0.1, STEPS.size))
        unbiased = rng.normal(0, 0.125, STEPS.size)          # the sampling noise of 64 responses
        lengths, corr = {
            "noisy_flat": (flat, unbiased),
            "slow_drift": (flat * np.linspace(1.0, 0.75, STEPS.size), unbiased),   # -25% over the run
            "one_step_spike": (np.where(STEPS == 50, 50.0, flat), unbiased),
            "two_step_spike": (np.where((STEPS == 50) | (STEPS == 51), 50.0, flat), unbiased),
            "late_drop": (np.where(STEPS >= 250, 300.0, flat), unbiased),          # after the early window
            "drift_under_unbiased_reward": (_declining(seed), unbiased),
        }[name]
        v = collapse_warning(_series(lengths, corr, STEPS), StabilityConfig(early_steps=200))
        assert v.state == "quiet", (name, seed, v)


def test_hockey_stick_warning_leads_the_decline_detector():
    """A reward that declines over 20 steps: the warning comes before the hockey-stick onset is known
    online (onset + persistence - 1), and a noisy flat reward raises nothing."""
    for seed in range(5):
        rng = np.random.default_rng(seed)
        r = np.interp(STEPS, [0, 20, 40, 80, 160, 299], [0, 0, -1, -1, 0.3, 0.3]) + rng.normal(0, 0.05, STEPS.size)
        recs = [{"step": int(s), REWARD_KEY: float(x), REWARD_STD_KEY: 1.0} for s, x in zip(STEPS, r)]
        out = detect_run(recs)
        warn, hs = out["hockey_stick_warning"], out["hockey_stick"]
        assert warn.state == "warned" and hs.onset_step is not None
        assert warn.step < hs.onset_step + StabilityConfig().persistence - 1, (seed, warn, hs.onset_step)
        flat = rng.normal(0, 0.05, STEPS.size)
        assert hockey_stick_warning({REWARD_KEY: (STEPS, flat)}, scale=1.0).state == "quiet"


def test_online_warning_equals_offline():
    rng = np.random.default_rng(0)
    lengths = _declining(0, over=20)
    corr = -0.4 + rng.normal(0, 0.1, STEPS.size)
    recs = [{"step": int(s), LENGTH_KEY: float(a), LENGTH_CORR_KEY: float(c)} for s, a, c in zip(STEPS, lengths, corr)]
    mon = StabilityMonitor()
    flags = [mon.update(r["step"], r)["stability/collapse_warning"] for r in recs]
    first = int(np.argmax(np.asarray(flags) == 1.0))
    assert detect_run(recs)["collapse_warning"].step == recs[first]["step"]
    assert all(f == 1.0 for f in flags[first:]) and all(f == 0.0 for f in flags[:first])
    assert [e["step"] for e in mon.events if e["detector"] == "collapse_warning" and e["to"] == "warned"] == [first]
