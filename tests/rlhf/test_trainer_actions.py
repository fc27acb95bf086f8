"""Actions on a verdict inside `rlhf train` (``metrics.on_*``, ``rlhf.metrics.actions``): a tiny run
whose reward prefers short answers (``rlhf.rewards:short_answer``) collapses its length; with
``metrics.on_collapse_warning=stop`` it stops at the warning with a checkpoint of that step and the
action recorded, and ``--resume`` continues it to the end without firing again."""

from __future__ import annotations

import json

import pytest

from rlhf.config import load_config
from rlhf.trainer import RunStopped, latest_checkpoint, train

pytestmark = pytest.mark.slow

ARGS = ["reward.function=rlhf.rewards:short_answer", "trainer.save_every=0", "trainer.probe_every=0",
        "data.num_builtin=64", "trainer.total_steps=14", "metrics.baseline_steps=2", "metrics.smooth_window=3",
        "metrics.warn_smooth_window=1", "metrics.warn_persistence=1", "metrics.on_collapse_warning=stop"]


def test_stop_on_collapse_warning_then_resume(ray_address, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(RunStopped, match="collapse_warning -> warned at step .*metrics.on_collapse_warning = stop"):
        train(load_config(None, ARGS + [f"run_dir={run_dir}"]))
    events = [json.loads(x) for x in (run_dir / "stability_events.jsonl").read_text().splitlines()]
    (act,) = [e for e in events if "action" in e]
    step = act["step"]
    assert act["action"] == "stop" and act["trigger"] == "collapse_warning" and 1 < step < 14
    assert latest_checkpoint(run_dir).name == f"step_{step:06d}"
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == step and recs[-1]["stability/collapse_warning"] == 1.0
    bias = sorted(r["advantage/length_corr"] for r in recs[-3:])[1]   # median of 3 (metrics.smooth_window)
    assert bias <= -0.2                                  # the update prefers short answers: the indicator

    train(load_config(run_dir / "config.yaml", [f"run_dir={run_dir}"]), resume=True)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 15))
    events = [json.loads(x) for x in (run_dir / "stability_events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "action" in e] == [step]   # latched: no second stop
