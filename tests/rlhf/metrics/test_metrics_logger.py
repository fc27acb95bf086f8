"""MetricLogger: JSONL + real TensorBoard event files, verdict events, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlhf.metrics import MetricLogger, StabilityMonitor, read_jsonl


def _step_metrics(step):
    # the length collapses from step 6 on, so the detector changes its verdict mid-run
    rng = np.random.default_rng(step)
    length = (100.0 if step < 6 else 30.0) + rng.normal(0, 1)
    return {"rollout/length_mean": length, "reward/mean": float(rng.normal()), "reward/std": 1.0,
            "kl/policy_vs_sampling": 1e-3 * step, "critic/explained_var": float("nan")}


def _run(run_dir, steps, resume_step=None):
    logger = MetricLogger(run_dir, resume_step=resume_step, monitor=StabilityMonitor({"persistence": 2}))
    for s in steps:
        logger.log(s, _step_metrics(s))
    logger.close()


def _scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return acc, [(e.step, e.value) for e in acc.Scalars(tag)]


def test_jsonl_and_tensorboard_read_back(tmp_path):
    _run(tmp_path, range(12))
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(12))
    assert recs[3]["kl/policy_vs_sampling"] == pytest.approx(3e-3)
    assert recs[3]["critic/explained_var"] is None                    # NaN -> null, strict JSON
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert recs[-1]["stability/length_collapse"] == 1.0
    acc, kl = _scalars(tmp_path, "kl/policy_vs_sampling")
    assert [s for s, _ in kl] == list(range(12)) and kl[5][1] == pytest.approx(5e-3)
    assert "critic/explained_var" not in acc.Tags()["scalars"]         # non-finite never reaches TB
    assert acc.Scalars("stability/length_collapse")[-1].value == 1.0
    events = read_jsonl(tmp_path / "stability_events.jsonl")
    lc = [e for e in events if e["detector"] == "length_collapse"]
    assert [e["to"] for e in lc] == ["none", "collapsed"]             # logged when it changes, once
    assert lc[1]["evidence"]["onset_step"] >= 6
    assert "stability/events/text_summary" in acc.Tags()["tensors"]


def test_resume_drops_later_records_and_matches_uninterrupted_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(straight, range(12))
    _run(resumed, range(9))                  # crashed after logging step 8; last checkpoint at step 4
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "rollout/len')   # and a half-written line
    _run(resumed, range(5, 12), resume_step=4)
    assert (resumed / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()
    assert (resumed / "stability_events.jsonl").read_text() == (straight / "stability_events.jsonl").read_text()
    _, kl = _scalars(resumed, "kl/policy_vs_sampling")
    assert [s for s, _ in kl] == list(range(12))                      # TensorBoard purged steps > 4


def test_fresh_start_keeps_old_files_as_backup(tmp_path):
    _run(tmp_path, range(5))
    _run(tmp_path, range(3))                 # restarted from scratch (no checkpoint yet)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2]
    assert len(read_jsonl(tmp_path / "metrics.jsonl.bak")) == 5
    _, kl = _scalars(tmp_path, "kl/policy_vs_sampling")
    assert [s for s, _ in kl] == [0, 1, 2]
