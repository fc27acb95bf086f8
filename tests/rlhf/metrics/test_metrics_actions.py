"""Actions on verdicts (``rlhf.metrics.actions``): which events fire which switch, and
``take_actions`` on a real ``MetricLogger`` + monitor (events file, save callback, stop reason)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlhf.metrics import MetricLogger, StabilityConfig, StabilityMonitor
from rlhf.metrics.actions import due_actions, take_actions
from rlhf.metrics.config import MetricsConfigError
from rlhf.metrics.detectors import LENGTH_KEY
from rlhf.metrics.warning import LENGTH_CORR_KEY


def test_due_actions_per_switch():
    cfg = StabilityConfig(on_collapse_warning="stop", on_collapse="checkpoint")
    events = [{"step": 3, "detector": "collapse_warning", "from": None, "to": "quiet"},
              {"step": 7, "detector": "collapse_warning", "from": "quiet", "to": "warned"},
              {"step": 9, "detector": "length_collapse", "from": "none", "to": "collapsed"},
              {"step": 9, "detector": "hockey_stick", "from": "no_drop/baseline", "to": "hockey_stick/trough"}]
    acts = due_actions(events, cfg)
    assert [(a["step"], a["action"], a["trigger"]) for a in acts] == [(7, "stop", "collapse_warning"),
                                                                     (9, "checkpoint", "length_collapse")]
    assert "metrics.on_collapse_warning = stop" in acts[0]["reason"]
    assert due_actions(events, StabilityConfig()) == []          # default: log only
    with pytest.raises(MetricsConfigError, match="metrics.on_collapse"):
        StabilityConfig.from_dict({"on_collapse": "restart"})


def test_take_actions_on_a_logger(tmp_path):
    cfg = StabilityConfig(on_collapse_warning="stop")
    rng = np.random.default_rng(0)
    lengths = np.interp(np.arange(40), [0, 10, 30, 39], [100, 100, 30, 30])
    saved, stop_at, reason = [], None, None
    with MetricLogger(tmp_path, monitor=StabilityMonitor(cfg), tensorboard=False) as logger:
        for step in range(40):
            logger.log(step, {LENGTH_KEY: float(lengths[step]), LENGTH_CORR_KEY: -0.5 + 0.05 * rng.normal()})
            reason = take_actions(logger, cfg, lambda: saved.append(step) or f"step_{step}")
            if reason:
                stop_at = step
                break
    assert stop_at is not None and saved == [stop_at] and f"checkpoint step_{stop_at}" in reason
    events = [json.loads(x) for x in (tmp_path / "stability_events.jsonl").read_text().splitlines()]
    assert events[-1]["action"] == "stop" and events[-1]["step"] == stop_at
    assert any(e.get("detector") == "collapse_warning" and e["to"] == "warned" and e["step"] == stop_at for e in events)


def test_report_lists_warnings_and_actions(tmp_path):
    """`rlhf report`'s summary.md shows the collapse warning's step and each action taken."""
    from rlhf.report import write_report

    cfg = StabilityConfig(on_collapse_warning="checkpoint")
    lengths = np.interp(np.arange(40), [0, 10, 30, 39], [100, 100, 30, 30])
    run = tmp_path / "run"
    with MetricLogger(run, monitor=StabilityMonitor(cfg), tensorboard=False) as logger:
        for step in range(1, 41):
            logger.log(step, {LENGTH_KEY: float(lengths[step - 1]), LENGTH_CORR_KEY: -0.5,
                              "reward/mean": 0.1 * step, "reward/std": 1.0})
            take_actions(logger, cfg, lambda: "ckpt")
    out = write_report([run], tmp_path / "report")
    text = (out / "summary.md").read_text()
    warned = [json.loads(x) for x in (run / "stability_events.jsonl").read_text().splitlines() if "action" in x]
    assert warned and f"| collapse warning step (early warning) | {warned[0]['step']} |" in text
    assert f"| action at step {warned[0]['step']} | checkpoint: collapse_warning -> warned" in text
