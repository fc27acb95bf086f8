"""The collapse warning on recorded organism runs (committed fixtures from
``benchmarks/warning_lead.py --fixtures``): every collapse run (reward model + mix init, and the
BAI sweep runs) is warned at least 3 steps before its raw mean length halves; no exact-reward
control is warned. Replays the recorded metrics through the detectors at default thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.metrics.detectors import detect_run
from rlhf.metrics.warning import lead_time

FIXTURES = Path(__file__).parent / "fixtures" / "warning"
RUNS = sorted(p.stem for p in FIXTURES.glob("*.jsonl"))


def _records(name: str) -> list[dict]:
    return [json.loads(x) for x in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]


def test_fixtures_exist():
    assert sum("exact" in n for n in RUNS) >= 3 and sum("exact" not in n for n in RUNS) >= 3


@pytest.mark.parametrize("name", RUNS)
def test_warning_lead_time(name):
    recs = _records(name)
    warn = detect_run(recs)["collapse_warning"]
    want = json.loads((FIXTURES / "expected.json").read_text())[name]
    assert warn.step == want["warning"]
    if "exact" in name:
        assert warn.state == "quiet"                     # a control: never warned
    else:
        lead = lead_time([r["step"] for r in recs], [r["rollout/length_mean"] for r in recs], warn.step)
        assert lead is not None and lead >= 3, (name, warn, lead)
