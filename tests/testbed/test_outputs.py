"""`rlhf testbed build` and `rlhf demo` use or replace only directories they created (issue 12
point 1): the output is checked before anything is written; no full build runs here."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from bairlhf.outputs import MARKER, mark_output, owner
from rlhf import demo
from rlhf.testbed import build
from tests.badinput.harness import snapshot

SMALL = build.BuildSpec(**build.SMALL)


def _fake_build(d, spec=SMALL, marked=True):
    """A build directory's top level (what check_out looks at), without models."""
    (d / "models").mkdir(parents=True)
    (d / "spec.json").write_text(json.dumps(dataclasses.asdict(spec)))
    if marked:
        mark_output(d, build.COMMAND)
    return d


def test_build_out_absent_empty_same_spec_other_spec(tmp_path):
    assert build.check_out(tmp_path / "new", SMALL) == "new"
    (tmp_path / "empty").mkdir()
    assert build.check_out(tmp_path / "empty", SMALL) == "new"
    d = _fake_build(tmp_path / "b")
    assert build.check_out(d, SMALL) == "reuse"
    other = build.BuildSpec(**{**build.SMALL, "seed": 3})
    with pytest.raises(build.BuildError, match="different spec \\(seed\\)"):
        build.check_out(d, other)
    assert build.check_out(d, other, force=True) == "rebuild"


def test_build_force_never_touches_a_directory_it_did_not_create(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    (d / "spec.json").write_text("{}")
    before = snapshot(tmp_path)
    for force in (False, True):
        with pytest.raises(build.BuildError, match="is not a testbed build"):
            build.build(d, SMALL, force=force)
    (tmp_path / "merged").mkdir()
    mark_output(tmp_path / "merged", "bai merge")
    with pytest.raises(build.BuildError, match="was written by `bai merge`"):
        build.build(tmp_path / "merged", SMALL, force=True)
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("merged")} == before


def test_build_adopts_an_unmarked_cache_with_only_its_own_layout(tmp_path):
    d = _fake_build(tmp_path / "old", marked=False)
    (d / "build_report.md").write_text("# Testbed build report\n")
    assert build.legacy_build(d) and build.check_out(d, SMALL) == "reuse"
    (d / "notes.txt").write_text("mine")
    assert not build.legacy_build(d)
    with pytest.raises(build.BuildError, match="is not a testbed build"):
        build.check_out(d, SMALL, force=True)


def test_build_corrupt_spec_json_is_named_and_force_rebuilds_its_own(tmp_path):
    d = _fake_build(tmp_path / "b")
    (d / "spec.json").write_text("{not json")
    with pytest.raises(build.BuildError, match="spec.json: not valid JSON"):
        build.check_out(d, SMALL)
    assert build.check_out(d, SMALL, force=True) == "rebuild"


def test_build_spec_values_are_checked():
    for field, value in [("arch", "gpt2"), ("rm_init", "nope"), ("num_layers", 0), ("max_digits", 0),
                         ("mix_empty_fraction", 1.5), ("sft_lr", -1.0), ("sweep", [1.0])]:
        with pytest.raises(build.BuildError, match=field):
            build.check_spec(build.BuildSpec(**{**build.SMALL, field: value}))
    build.check_spec(build.BuildSpec(**demo.DEMO_SPEC))


def _fake_demo(root, marked=True):
    (root / "models").mkdir(parents=True)
    _fake_build(root / "testbed", build.BuildSpec(**demo.DEMO_SPEC))
    if marked:
        mark_output(root, demo.COMMAND)
    return root


def test_demo_out_reuses_only_its_own_directory(tmp_path):
    demo.check_out(tmp_path / "new", 0.3)
    root = _fake_demo(tmp_path / "demo")
    demo.check_out(root, 0.3)
    (root / "ppo" / "mix_sft").mkdir(parents=True)
    (root / "ppo" / "mix_sft" / "metrics.jsonl").write_text("")
    demo.check_out(root, 0.3)
    legacy = _fake_demo(tmp_path / "legacy", marked=False)
    (legacy / "bai_alpha_0.3.yaml").write_text("method: bai\n")
    _write(legacy / "bai_sweep" / "alpha_0.1" / "bai_merge.yaml", "method: bai\n")
    _write(legacy / "bai_sweep" / "eval.json", "{}")  # the older demo's evaluation, beside the merges
    _write(legacy / "report" / "organism.png")
    assert demo.legacy_demo(legacy)
    demo.check_out(legacy, 0.3)
    _write(legacy / "bai_sweep" / "notes.txt")
    with pytest.raises(demo.DemoError, match="demo's merge"):
        demo.check_out(legacy, 0.3)
    home = tmp_path / "home"
    (home / "testbed").mkdir(parents=True)
    (home / "photos").mkdir()
    with pytest.raises(demo.DemoError, match="is not a demo directory"):
        demo.check_out(home, 0.3)


def _write(path, text="x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _unmarked_testbed_with_notes(root):
    os.remove(root / "testbed" / MARKER)
    _write(root / "testbed" / "notes.txt")


@pytest.mark.parametrize("make, match", [
    (lambda r: (r / "models" / "base").mkdir(), "not a link the demo made"),
    (lambda r: _write(r / "ppo" / "mix_sft" / "data.bin"), "not a run directory"),
    (lambda r: _write(r / "report" / "paper.tex"), "demo's report"),
    (lambda r: _write(r / "bai_sweep" / "model.safetensors"), "demo's merge"),
    (_unmarked_testbed_with_notes, "is not a testbed build"),
])
def test_demo_refuses_what_it_did_not_create_inside_its_directory(tmp_path, make, match):
    root = _fake_demo(tmp_path / "demo")
    make(root)
    before = snapshot(tmp_path)
    with pytest.raises(demo.DemoError if "testbed" not in match else build.BuildError, match=match):
        demo.check_out(root, 0.3)
    assert snapshot(tmp_path) == before


def test_demo_out_must_not_contain_its_input_config():
    with pytest.raises(demo.DemoError, match="contains the demo's input"):
        demo.check_out(demo.REPO / "configs", 0.3)
    with pytest.raises(demo.DemoError, match="is the demo's input"):
        demo.check_out(demo.PPO_CONFIG, 0.3)


def test_link_models_replaces_only_links(tmp_path):
    root = _fake_demo(tmp_path / "demo")
    (root / "models" / "base").symlink_to("elsewhere")  # a stale link of an older layout
    demo.link_models(root)
    assert {p.name: os.readlink(p) for p in (root / "models").iterdir()} == {
        n: os.path.join("..", "testbed", "models", t) for n, t in demo.LINKS.items()}
    (root / "models" / "base").unlink()
    (root / "models" / "base").mkdir()
    (root / "models" / "base" / "weights").write_text("x")
    with pytest.raises(demo.DemoError, match="not a link"):
        demo.link_models(root)
    assert (root / "models" / "base" / "weights").read_text() == "x"
