"""The pure parts of the ``rollback`` action (``rlhf.metrics.actions``): the step a rollback goes
back before, which checkpoint it restores, ``rollback_max`` and the fallback, the change applied
(KL and learning-rate factors, the merge), the event record, and the config's ranges."""

from __future__ import annotations

import pytest

from rlhf.metrics import StabilityConfig
from rlhf.metrics.actions import (describe, due_actions, fire_step, lr_factor, pick_rollback, rollback_change,
                                  rollback_record, rollback_target)
from rlhf.metrics.config import MetricsConfigError

WARNED = {"step": 9, "detector": "collapse_warning", "from": "quiet", "to": "warned",
          "evidence": {"state": "warned", "step": 9}}
COLLAPSED = {"step": 12, "detector": "length_collapse", "from": "none", "to": "collapsed",
             "evidence": {"verdict": "collapsed", "onset_step": 7}}


def test_fire_step_is_the_onset_when_earlier():
    assert fire_step(WARNED) == 9
    assert fire_step(COLLAPSED) == 7                   # the collapse began before it was detected
    assert fire_step({"step": 4, "evidence": {"onset_step": None}}) == 4


def test_rollback_target_is_the_last_checkpoint_before():
    assert rollback_target([2, 4, 6, 8], 9) == 8
    assert rollback_target([2, 4, 6, 8], 8) == 6      # a checkpoint at the firing step is not before it
    assert rollback_target([4, 2], 3) == 2
    assert rollback_target([4], 4) is None and rollback_target([], 10) is None


def test_due_rollback_goes_before_the_warning_or_the_onset():
    cfg = StabilityConfig(on_collapse_warning="rollback", on_collapse="rollback")
    (act,) = due_actions([WARNED], cfg, checkpoint_steps=[3, 6, 9])
    assert act["action"] == "rollback" and act["fired_at"] == 9 and act["restored_step"] == 6 and act["step"] == 9
    (act,) = due_actions([COLLAPSED], cfg, checkpoint_steps=[3, 6, 9, 12])
    assert act["restored_step"] == 6                  # before the onset (7), not the detection (12)


def test_rollback_max_and_the_fallback():
    cfg = StabilityConfig(on_collapse_warning="rollback", rollback_max=1, rollback_fallback="stop")
    done = [{"restored_step": 2, "rollback": 1}]
    (act,) = due_actions([WARNED], cfg, rollbacks=done, checkpoint_steps=[2, 6])
    assert act["action"] == "stop" and "metrics.rollback_max = 1 rollback(s) already made" in act["reason"]
    assert "metrics.rollback_fallback = stop" in act["reason"] and "restored_step" not in act
    (act,) = due_actions([WARNED], StabilityConfig(on_collapse_warning="rollback"), checkpoint_steps=[10])
    assert act["action"] == "log" and "no checkpoint before step 9" in act["reason"]   # still recorded
    # a second rollback never goes back past the first one's restored step
    cfg = StabilityConfig(on_collapse_warning="rollback", rollback_max=2)
    (act,) = due_actions([WARNED], cfg, rollbacks=[{"restored_step": 6, "rollback": 1}], checkpoint_steps=[2, 4, 6])
    assert act["restored_step"] == 6
    (act,) = due_actions([COLLAPSED], StabilityConfig(on_collapse="rollback", rollback_max=2),
                         rollbacks=[{"restored_step": 8, "rollback": 1}], checkpoint_steps=[2, 4, 6, 8, 10])
    assert act["action"] == "log" and "no checkpoint before step 7" in act["reason"]


def test_a_firing_on_the_replayed_step_after_a_kl_or_lr_rollback_is_only_logged():
    # rolled back to step 8; step 9 replays the batch the restored weights sampled: the same
    # evidence, before the change acted, so no second rollback (nor a fallback stop) at step 9
    cfg = StabilityConfig(on_collapse_warning="rollback", rollback_max=3, rollback_fallback="stop")
    for kind in ("kl", "lr"):
        done = [{"restored_step": 8, "rollback": 1, "change": {"kind": kind}}]
        (act,) = due_actions([WARNED], cfg, rollbacks=done, checkpoint_steps=[4, 8])
        assert act["action"] == "log" and "restored_step" not in act
        assert "replayed from the rollback to step 8 before its change could act" in act["reason"]
        later = dict(WARNED, step=11)                  # after updates made with the change: acts again
        (act,) = due_actions([later], cfg, rollbacks=done, checkpoint_steps=[4, 8, 10])
        assert act["action"] == "rollback" and act["restored_step"] == 10
    cfg1 = StabilityConfig(on_collapse_warning="rollback", rollback_max=1, rollback_fallback="stop")
    (act,) = due_actions([WARNED], cfg1, rollbacks=done, checkpoint_steps=[8])
    assert act["action"] == "log"                     # not the fallback stop either
    # after a merge the merged weights sample step 9: new evidence, so it acts
    merged = [{"restored_step": 8, "rollback": 1, "change": {"kind": "merge"}}]
    (act,) = due_actions([WARNED], cfg, rollbacks=merged, checkpoint_steps=[4, 8])
    assert act["action"] == "rollback" and act["restored_step"] == 8


def test_pick_rollback_a_stop_wins():
    cfg = StabilityConfig(on_collapse_warning="rollback", on_hockey_stick_warning="stop")
    hs = {"step": 9, "detector": "hockey_stick_warning", "from": "quiet", "to": "warned"}
    acts = due_actions([WARNED, hs], cfg, checkpoint_steps=[4])
    assert [a["action"] for a in acts] == ["rollback", "stop"] and pick_rollback(acts) is None
    assert pick_rollback(acts[:1])["restored_step"] == 4
    assert pick_rollback([]) is None


def test_the_changes_and_their_factors():
    kl = rollback_change(StabilityConfig(rollback_change="kl", rollback_kl_factor=4.0), 0.05)
    assert kl == {"kind": "kl", "factor": 4.0, "kl_coef": [0.05, pytest.approx(0.2)]}
    lr = rollback_change(StabilityConfig(rollback_change="lr", rollback_lr_factor=0.25), 0.05)
    assert lr == {"kind": "lr", "factor": 0.25}
    mg = rollback_change(StabilityConfig(rollback_change="merge", rollback_merge_ratio=0.3), 0.05, "/base")
    assert mg == {"kind": "merge", "ratio": 0.3, "base": "/base"}
    recs = [{"change": lr}, {"change": mg}, {"change": {"kind": "lr", "factor": 0.5}}]
    assert lr_factor(recs) == pytest.approx(0.125) and lr_factor([]) == 1.0 and lr_factor([{"change": kl}]) == 1.0
    assert describe(kl) == "KL coefficient x 4 (0.05 -> 0.2)" and describe(lr) == "learning rates x 0.25"
    assert describe(mg) == "actor re-merged with /base at ratio 0.3"


def test_rollback_record():
    (act,) = due_actions([WARNED], StabilityConfig(on_collapse_warning="rollback"), checkpoint_steps=[6])
    rec = rollback_record(act, {"kind": "kl", "factor": 2.0, "kl_coef": [0.01, 0.02]}, 1, "step_000006")
    assert {k: rec[k] for k in ("step", "action", "trigger", "to", "fired_at", "restored_step", "checkpoint",
                                "rollback")} == {"step": 6, "action": "rollback", "trigger": "collapse_warning",
                                                 "to": "warned", "fired_at": 9, "restored_step": 6,
                                                 "checkpoint": "step_000006", "rollback": 1}
    assert rec["change"]["kl_coef"] == [0.01, 0.02]
    assert rec["reason"] == ("collapse_warning -> warned at step 9 (metrics.on_collapse_warning = rollback): "
                             "rolled back to step_000006 (step 6), KL coefficient x 2 (0.01 -> 0.02); rollback 1")


@pytest.mark.parametrize("key,value,msg", [
    ("rollback_change", "temperature", "metrics.rollback_change"),
    ("rollback_kl_factor", 0, "metrics.rollback_kl_factor: must be > 0"),
    ("rollback_lr_factor", -0.5, "metrics.rollback_lr_factor: must be > 0"),
    ("rollback_merge_ratio", 0, "metrics.rollback_merge_ratio"),
    ("rollback_merge_ratio", 1.5, "metrics.rollback_merge_ratio"),
    ("rollback_max", 0, "metrics.rollback_max: must be >= 1"),
    ("rollback_fallback", "rollback", "metrics.rollback_fallback"),
    ("on_hockey_stick", "restart", "metrics.on_hockey_stick"),
])
def test_rollback_keys_are_checked(key, value, msg):
    with pytest.raises(MetricsConfigError, match=msg):
        StabilityConfig.from_dict({key: value})
    assert StabilityConfig.from_dict({"on_collapse": "rollback", "rollback_merge_ratio": 1}).rollback_merge_ratio == 1


def test_report_lists_a_rollback(tmp_path):
    """A rollback record reaches `rlhf report`'s summary as an action row (and TensorBoard text via
    ``log_events``, as every action)."""
    from rlhf.metrics import MetricLogger
    from rlhf.report import write_report

    run = tmp_path / "run"
    (act,) = due_actions([WARNED], StabilityConfig(on_collapse_warning="rollback"), checkpoint_steps=[6])
    rec = rollback_record(act, {"kind": "lr", "factor": 0.5}, 1, "step_000006")
    with MetricLogger(run, tensorboard=False) as logger:
        for step in range(1, 11):
            logger.log(step, {"rollout/length_mean": 50.0, "reward/mean": 0.1 * step, "reward/std": 1.0})
            if step == 6:
                logger.log_events([rec])
    text = (write_report([run], tmp_path / "report") / "summary.md").read_text()
    assert ("| action at step 6 | rollback: collapse_warning -> warned at step 9 (metrics.on_collapse_warning = "
            "rollback): rolled back to step_000006 (step 6), learning rates x 0.5; rollback 1 |") in text
