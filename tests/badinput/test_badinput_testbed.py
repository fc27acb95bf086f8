"""Bad input to `rlhf testbed build` and `rlhf demo`: one named error, exit code 2, nothing
written (issue 12 points 1 and 2). Every case stops before a model is built."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bairlhf.outputs import mark_output
from rlhf import demo
from rlhf.testbed import build
from tests.badinput.harness import Case, run_case


def _mine(d):
    (d / "mine").mkdir()
    (d / "mine" / "thesis.tex").write_text("years of work\n")


def _file(d):
    (d / "file.txt").write_text("not a directory\n")


def _marked(command):
    def setup(d):
        (d / "other").mkdir()
        (d / "other" / "model.safetensors").write_text("x")
        mark_output(d / "other", command)
    return setup


def _small_build(d, spec_text=None):
    (d / "tb" / "models").mkdir(parents=True)
    (d / "tb" / "spec.json").write_text(spec_text or json.dumps(dataclasses.asdict(build.BuildSpec(**build.SMALL))))
    mark_output(d / "tb", build.COMMAND)


def _dangling(d):
    (d / "gone").symlink_to(d / "never-there")


def _demo_dir(extra=None):
    def setup(d):
        root = d / "demo"
        (root / "models").mkdir(parents=True)
        (root / "testbed").mkdir()
        (root / "testbed" / "spec.json").write_text(json.dumps(dataclasses.asdict(build.BuildSpec(**demo.DEMO_SPEC))))
        mark_output(root / "testbed", build.COMMAND)
        mark_output(root, demo.COMMAND)
        if extra:
            extra(root)
    return setup


def _foreign_report(root):
    (root / "report").mkdir()
    (root / "report" / "paper.tex").write_text("x")


CASES = [
    # rlhf testbed build: flags
    Case("build-seed-not-int", ["rlhf", "testbed", "build", "--seed", "abc", "--out", "{d}/tb"], "--seed"),
    Case("build-seed-negative", ["rlhf", "testbed", "build", "--seed", "-1", "--out", "{d}/tb"], "--seed"),
    Case("build-arch-unknown", ["rlhf", "testbed", "build", "--arch", "gpt2", "--out", "{d}/tb"], "--arch"),
    Case("build-threads-zero", ["rlhf", "testbed", "build", "--threads", "0", "--out", "{d}/tb"], "--threads"),
    Case("build-small-and-long", ["rlhf", "testbed", "build", "--small", "--long", "--out", "{d}/tb"], "--small, --long"),
    Case("build-unknown-flag", ["rlhf", "testbed", "build", "--tiny"], "unrecognized arguments: --tiny"),
    Case("testbed-unknown-command", ["rlhf", "testbed", "frobnicate"], "unknown command 'frobnicate'"),
    # rlhf testbed build: the output directory
    Case("build-out-foreign-dir", ["rlhf", "testbed", "build", "--out", "{d}/mine"], "is not a testbed build", _mine),
    Case("build-force-foreign-dir", ["rlhf", "testbed", "build", "--force", "--out", "{d}/mine"],
         "is not a testbed build", _mine),
    Case("build-out-is-a-file", ["rlhf", "testbed", "build", "--out", "{d}/file.txt"], "is not a directory", _file),
    Case("build-force-other-command", ["rlhf", "testbed", "build", "--force", "--out", "{d}/other"],
         "was written by `bai merge`", _marked("bai merge")),
    Case("build-cache-other-spec", ["rlhf", "testbed", "build", "--out", "{d}/tb"], "different spec", _small_build),
    Case("build-cache-corrupt-spec", ["rlhf", "testbed", "build", "--small", "--out", "{d}/tb"], "spec.json",
         lambda d: _small_build(d, "{broken")),
    Case("build-cache-spec-not-object", ["rlhf", "testbed", "build", "--small", "--out", "{d}/tb"],
         "expected a JSON object", lambda d: _small_build(d, "[1, 2]")),
    Case("build-out-dangling-link", ["rlhf", "testbed", "build", "--out", "{d}/gone"], "dangling", _dangling),
    # rlhf demo: flags
    Case("demo-alpha-above-1", ["rlhf", "demo", "--alpha", "1.5", "--out", "{d}/demo"], "--alpha"),
    Case("demo-alpha-nan", ["rlhf", "demo", "--alpha", "nan", "--out", "{d}/demo"], "--alpha"),
    Case("demo-alpha-not-float", ["rlhf", "demo", "--alpha", "half", "--out", "{d}/demo"], "--alpha"),
    Case("demo-steps-zero", ["rlhf", "demo", "--steps", "0", "--out", "{d}/demo"], "--steps"),
    Case("demo-steps-not-int", ["rlhf", "demo", "--steps", "60.5", "--out", "{d}/demo"], "--steps"),
    Case("demo-seed-negative", ["rlhf", "demo", "--seed", "-2", "--out", "{d}/demo"], "--seed"),
    Case("demo-unknown-flag", ["rlhf", "demo", "--gpus", "8"], "unrecognized arguments"),
    # rlhf demo: the output directory
    Case("demo-out-foreign-dir", ["rlhf", "demo", "--out", "{d}/mine"], "is not a demo directory", _mine),
    Case("demo-out-is-a-file", ["rlhf", "demo", "--out", "{d}/file.txt"], "is not a directory", _file),
    Case("demo-out-other-command", ["rlhf", "demo", "--out", "{d}/other"], "was written by `rlhf report`",
         _marked("rlhf report")),
    Case("demo-out-contains-its-config", ["rlhf", "demo", "--out", str(demo.REPO / "configs")],
         "contains the demo's input"),
    Case("demo-models-real-dir", ["rlhf", "demo", "--out", "{d}/demo"], "not a link the demo made",
         _demo_dir(lambda r: (r / "models" / "base").mkdir())),
    Case("demo-foreign-report", ["rlhf", "demo", "--out", "{d}/demo"], "demo's report", _demo_dir(_foreign_report)),
    Case("demo-testbed-foreign", ["rlhf", "demo", "--out", "{d}/demo"], "was written by `bai merge`",
         _demo_dir(lambda r: mark_output(r / "testbed", "bai merge"))),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, tmp_path, capsys, monkeypatch):
    run_case(case, tmp_path, capsys, monkeypatch)
