"""The length-collapse detector on recorded metrics of real organism runs (committed fixtures).

``fixtures/*.jsonl`` are per-step metrics (a few columns) of ``rlhf train configs/testbed/*.yaml``
runs on the default build, cut from the runs of ``benchmarks/testbed_matrix.py`` (see
docs/testbed.md). The detector must call them as the matrix did: collapse with the reward model
from the mix init, none with the exact-correctness reward.
"""

import json
from pathlib import Path

import pytest

from rlhf.metrics.detectors import StabilityConfig, detect_run

FIXTURES = Path(__file__).parent / "fixtures"
CFG = StabilityConfig(bucket_width=10, num_buckets=10)  # configs/testbed/*.yaml metrics section


def _rows(name):
    return [json.loads(l) for l in (FIXTURES / name).read_text().splitlines() if l.strip()]


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.jsonl")))
def test_recorded_run_verdict(name):
    rows = _rows(name)
    verdict = detect_run(rows, CFG)["length_collapse"]
    meta = json.loads((FIXTURES / "expected.json").read_text())[name]
    assert (verdict.verdict != "none") == meta["collapse"], (name, verdict)
    if meta["collapse"]:
        assert verdict.onset_step is not None and verdict.depth <= CFG.collapse_fraction
