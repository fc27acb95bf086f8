"""MetricLogger: JSONL + real TensorBoard event files, verdict events, exact resume."""

from __future__ import annotations

import json
import time

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


def _bucketed(step):
    # 10-token buckets; the batch moves from ~45 tokens to ~15 tokens at step 3 (a collapse)
    counts = [0, 0, 0, 1, 6, 1, 0, 0] if step < 3 else [0, 2, 6, 0, 0, 0, 0, 0]
    rec = {f"reward/bucket_{i:02d}_count": float(c) for i, c in enumerate(counts)}
    rec.update({"rollout/length_mean": 45.0 if step < 3 else 15.0, "rollout/length_std": 3.0,
                "rollout/length_min": 38.0 if step < 3 else 11.0, "rollout/length_max": 52.0 if step < 3 else 19.0,
                "reward/mean": 0.5})
    return rec


def test_length_histogram_from_bucket_counts():
    from rlhf.metrics.logger import length_histogram

    counts, edges = length_histogram(_bucketed(0), 10, 8)
    assert counts == [0, 0, 0, 1, 6, 1] and edges == [0, 10, 20, 30, 40, 50, 60]   # trailing empties dropped
    full = {f"reward/bucket_{i:02d}_count": 1.0 for i in range(3)} | {"rollout/length_max": 87.0}
    assert length_histogram(full, 10, 3) == ([1.0, 1.0, 1.0], [0, 10, 20, 88.0])  # open last bucket closed at max + 1
    assert length_histogram({"reward/mean": 1.0}, 10, 3) is None


def test_tensorboard_length_histograms_per_step(tmp_path):
    from rlhf.metrics import StabilityConfig

    with MetricLogger(tmp_path, buckets=StabilityConfig(bucket_width=10, num_buckets=8)) as logger:
        for s in range(5):
            logger.log(s, _bucketed(s))
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0})   # 0: keep all
    acc.Reload()
    hists = acc.Histograms("rollout/length_hist")
    assert [h.step for h in hists] == list(range(5))
    h0, h4 = hists[0].histogram_value, hists[4].histogram_value
    assert list(h0.bucket) == [0, 0, 0, 1, 6, 1] and list(h0.bucket_limit) == [10, 20, 30, 40, 50, 60]
    assert list(h4.bucket) == [0, 2, 6] and h4.num == 8 and h4.min == 11 and h4.max == 19
    assert h4.sum == pytest.approx(15.0 * 8)


def test_loggers_selected_by_name(tmp_path):
    with MetricLogger(tmp_path / "j", loggers=["jsonl"]) as logger:
        logger.log(0, {"reward/mean": 1.0})
    assert (tmp_path / "j" / "metrics.jsonl").exists() and not (tmp_path / "j" / "tensorboard").exists()
    with pytest.raises(ValueError, match="mlflow"):
        MetricLogger(tmp_path / "x", loggers=["jsonl", "mlflow"])


def test_wandb_offline_run_holds_logged_keys_and_resume_keeps_its_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")          # no network, no login
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    with MetricLogger(run_dir, loggers=["jsonl", "wandb"],
                      monitor=StabilityMonitor({"bucket_width": 10, "num_buckets": 8})) as logger:
        for s in range(3):
            logger.log(s, _bucketed(s) | {"kl/policy_vs_sampling": 0.25 + s})
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    keys = (b"kl/policy_vs_sampling", b"reward/mean", b"rollout/length_hist", b"stability/length_collapse")
    for _ in range(600):   # wandb-core may still be writing the file after finish() returns (seen under load)
        data = b"".join(p.read_bytes() for p in runs[0].glob("run-*.wandb"))
        if all(k in data for k in keys) and b"2.25" in data:
            break
        time.sleep(0.1)
    for key in (b"kl/policy_vs_sampling", b"reward/mean", b"rollout/length_hist", b"stability/length_collapse"):
        assert key in data, key
    assert b"2.25" in data                                # the value logged at step 2
    run_id = (run_dir / "wandb" / "rlhf_run_id").read_text().strip()
    assert runs[0].name.endswith(run_id)
    assert not (run_dir / "tensorboard").exists()
    with MetricLogger(run_dir, resume_step=1, loggers=["jsonl", "wandb"]) as logger:   # resumed: same W&B id
        logger.log(2, _bucketed(2))
    assert (run_dir / "wandb" / "rlhf_run_id").read_text().strip() == run_id
    assert all(p.name.endswith(run_id) for p in (run_dir / "wandb").glob("offline-run-*"))
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2]
