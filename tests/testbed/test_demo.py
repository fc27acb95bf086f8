"""`rlhf demo` pieces that run in seconds: argument checks, the demo spec, and the verdict lines and
organism figure on recorded metrics of real organism runs (the committed fixtures).

The demo itself (organism build, BAI merge, two PPO runs, report) takes minutes; its timing is in
README.md. ``test_build.py`` covers the build and PPO path at CI size.
"""

import json
import shutil
from pathlib import Path

import pytest

from rlhf import demo
from rlhf.cli import demo as demo_cli
from rlhf.report import load_run
from rlhf.testbed.build import BuildSpec

FIXTURES = Path(__file__).parent / "fixtures"


def _run_dir(tmp_path, name):
    d = tmp_path / name.removesuffix(".jsonl")
    d.mkdir()
    shutil.copy(FIXTURES / name, d / "metrics.jsonl")
    (d / "config.yaml").write_text("metrics:\n  bucket_width: 10\n  num_buckets: 10\n")  # configs/testbed/rm_mix.yaml
    return d


def test_demo_spec_is_a_buildspec_with_reasoning_and_short_modes():
    spec = BuildSpec(**demo.DEMO_SPEC)
    assert spec.verify is False and 0 < spec.mix_empty_fraction < 1
    assert spec.max_digits >= 3  # traces long enough (>= 16 tokens) for a visible collapse


def test_demo_ppo_config_ships_with_the_checkout():
    assert demo.PPO_CONFIG.is_file()


@pytest.mark.parametrize("args, key", [(["--alpha", "1.5"], "--alpha"), (["--steps", "0"], "--steps")])
def test_demo_rejects_bad_arguments(args, key):
    with pytest.raises(demo.DemoError, match=key):
        demo_cli.main(args + ["--out", "/nonexistent/never-written"])


def test_verdict_lines_and_figure_on_recorded_organism_runs(tmp_path):
    expected = json.loads((FIXTURES / "expected.json").read_text())
    runs = [load_run(_run_dir(tmp_path, name)) for name in sorted(expected)]
    for run in runs:
        line = demo.verdict_line(run)
        collapsed = expected[f"{run.path.name}.jsonl"]["collapse"]
        assert ("DETECTED" in line) == collapsed, line
        assert "think rate" in line and "gold accuracy" in line
    demo.organism_figure(runs, tmp_path / "organism.png")
    assert (tmp_path / "organism.png").stat().st_size > 10_000
