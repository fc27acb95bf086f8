"""Faults in `bai merge` and `bai calibrate` (issue 12, point 7): SIGKILL mid-way, then a clean rerun.

Each test kills a real `bai` process (``python -m bai.cli``) at a known stage, found by polling
the files it writes (no timing assertions), and checks that

- nothing is left at the output directory DIR from the killed run (outputs are built in a hidden
  temporary sibling and renamed when complete), and an older output at DIR is untouched;
- the next run succeeds, removes (or, for a calibration killed after its SFT, adopts) the
  leftovers, and writes the same output as an uninterrupted run (both commands are
  deterministic: weights are compared byte for byte).

``BAI_MERGE_SLOWDOWN_S`` (a sleep after each output tensor) slows merges down so the kill lands
inside one; the calibration uses full SFT so its probes and final model stream through
``bai merge`` too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import bai
from bai import cli as bai_cli
from bairlhf.outputs import owner

pytestmark = pytest.mark.slow


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _weights(d: Path) -> dict[str, bytes]:
    """The files that define a checkpoint (shards, index, config), by relative path."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.suffix == ".safetensors" or p.name in ("model.safetensors.index.json", "config.json")}


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _start(args: list[str], slowdown: float | None = None) -> subprocess.Popen:
    """``bai ARGS`` in a fresh process (its own process group port: an in-process run of this
    test session may have left MASTER_PORT & co. in the environment); stderr kept for failures."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    if slowdown:
        env["BAI_MERGE_SLOWDOWN_S"] = str(slowdown)
    return subprocess.Popen([sys.executable, "-m", "bai.cli", *args], env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(proc: subprocess.Popen, ready, what: str, limit_s: float = 600) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` is true (``limit_s`` only guards a hung test)."""
    import threading

    err: list[str] = []
    drain = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)   # never blocks the child
    drain.start()
    deadline = time.monotonic() + limit_s
    while proc.poll() is None and not ready():
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what}: the stage was not reached")
        time.sleep(0.02)
    if proc.poll() is not None:
        drain.join(5)
        pytest.fail(f"{what}: the process ended (rc {proc.returncode}) before it could be killed:\n"
                    + "".join(err)[-3000:])
    proc.send_signal(signal.SIGKILL)
    proc.wait()


# ----------------------------------------------------------------------------- bai merge

def _recipe(fam: dict, tmp: Path, name: str = "recipe.yaml", **kw) -> Path:
    r = {"method": "bai", "base": str(fam["base"]), "alpha": 0.3, "dtype": "float32", "shard_size": "100KB",
         "sft_models": [{"path": str(fam["sft_a"]), "weight": 0.25}, {"path": str(fam["sft_b"]), "weight": 0.75}]}
    r.update(kw)
    p = tmp / name
    p.write_text(yaml.safe_dump({k: v for k, v in r.items() if v is not None}))
    return p


def _merge_tmp_has_shard(out: Path):
    return lambda: any(p.name.startswith(f".{out.name}.tmp-bai-") and any(p.rglob("*.safetensors"))
                       for p in out.parent.iterdir())


def test_killed_merge_leaves_nothing_and_rerun_matches(tiny_family, tmp_path):
    cfg = _recipe(tiny_family, tmp_path)
    ref = bai.merge(cfg, tmp_path / "ref", progress=False)[0]
    runs = tmp_path / "runs"
    runs.mkdir()
    out = runs / "merged"
    _kill_when(_start(["merge", str(cfg), "--out", str(out)], slowdown=0.2), _merge_tmp_has_shard(out), "merge")
    assert not out.exists()
    assert bai_cli.main(["merge", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in runs.iterdir()) == ["merged"]          # the killed run's temporary is gone
    assert _weights(out) == _weights(ref) and owner(out) == "bai merge"


def test_killed_sweep_keeps_the_old_output_and_rerun_matches(tiny_family, tmp_path):
    cfg = _recipe(tiny_family, tmp_path, alpha=None, alphas=[0.2, 0.8])
    ref = tmp_path / "ref"
    bai.merge(cfg, ref, progress=False)
    runs = tmp_path / "runs"
    runs.mkdir()
    # a fresh sweep killed mid-way leaves nothing at DIR
    new = runs / "new"
    _kill_when(_start(["merge", str(cfg), "--out", str(new)], slowdown=0.2), _merge_tmp_has_shard(new), "sweep")
    assert not new.exists()
    # a --force sweep over its own earlier output, killed mid-way, leaves the old output untouched
    old = runs / "old"
    bai.merge(_recipe(tiny_family, tmp_path, "earlier.yaml", alpha=None, alphas=[0.5]), old, progress=False)
    before = _tree(old)
    _kill_when(_start(["merge", str(cfg), "--out", str(old), "--force"], slowdown=0.2),
               _merge_tmp_has_shard(old), "sweep --force")
    assert _tree(old) == before
    # the reruns clean up the killed runs' temporaries and write what an uninterrupted run writes
    assert bai_cli.main(["merge", str(cfg), "--out", str(new), "--no-progress"]) == 0
    assert bai_cli.main(["merge", str(cfg), "--out", str(old), "--force", "--no-progress"]) == 0
    assert sorted(p.name for p in runs.iterdir()) == ["new", "old"]
    for d in (new, old):
        assert sorted(p.name for p in d.iterdir() if p.is_dir()) == ["alpha_0.2", "alpha_0.8"]
        assert _weights(d) == _weights(ref)


def test_kill_between_the_renames_of_a_forced_merge(tiny_family, tmp_path):
    """A --force run killed after moving the old output aside and before renaming the new one
    in leaves ``.DIR.old-PID``; the next run puts the old output back before anything else."""
    cfg = _recipe(tiny_family, tmp_path)
    out = tmp_path / "merged"
    bai.merge(cfg, out, progress=False)
    before = _tree(out)
    dead = subprocess.Popen(["true"])
    dead.wait()
    os.rename(out, tmp_path / f".merged.old-{dead.pid}")
    assert bai_cli.main(["merge", str(cfg), "--out", str(out), "--no-progress"]) == 2   # restored, so it exists
    assert _tree(out) == before and _hidden(tmp_path) == []


# ----------------------------------------------------------------------------- bai calibrate

@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    """A tiny reasoner, data, a full-SFT calibration config and one uninterrupted run (the reference)."""
    from rlhf import tiny

    root = tmp_path_factory.mktemp("calib_faults")
    tok = tiny.train_tokenizer(template="prefill")
    model = tiny.make_tiny_model(root / "model", tokenizer=tok, hidden_size=64, num_layers=2)
    with open(root / "train.jsonl", "w") as fh:
        fh.writelines(json.dumps({"input": f"What is {a} plus {b}?", "output": str(a + b)}) + "\n"
                      for a in range(4) for b in range(4))
    with open(root / "cal.jsonl", "w") as fh:
        fh.writelines(json.dumps({"input": f"What is {a} plus {b}?"}) + "\n" for a in range(4, 6) for b in range(4))
    cfg = root / "calib.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": str(model), "train_data": str(root / "train.jsonl"), "cal_data": str(root / "cal.jsonl"),
        "sft": {"method": "full", "epochs": 2, "lr": 1e-3, "batch_size": 8, "micro_batch_size": 8,
                "warmup_ratio": 0.0},
        "search": {"method": "binary", "max_steps": 3, "early_stop": False},
        "estimator": {"method": "logit", "device": "cpu"}}))
    ref = root / "ref"
    assert bai_cli.main(["calibrate", str(cfg), "--out", str(ref)]) == 0
    return {"root": root, "cfg": cfg, "ref": ref}


def _probes(run: Path) -> list[tuple[float, float]]:
    return [(p["sft_weight"], p["rho"]) for p in json.loads((run / "report.json").read_text())["probes"]]


def _calib_tmp(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-calibrate-")]


def _in_sft(out: Path):
    """The SFT step has started (its records are written) and not finished."""
    return lambda: any((t / "sft_train.jsonl").is_file() and not (t / "sft").exists() for t in _calib_tmp(out))


def _in_search(out: Path):
    """The SFT is complete and a probe merge of the search is being written."""
    return lambda: any((t / "sft" / "sft_meta.json").is_file() and (t / ".probes").is_dir()
                       and any((t / ".probes").iterdir()) for t in _calib_tmp(out))


def _same_as_ref(run: Path, ref: Path) -> None:
    assert (run / "report.json").is_file() and owner(run) == "bai calibrate"
    assert _probes(run) == _probes(ref)
    assert _weights(run / "model") == _weights(ref / "model")
    assert _weights(run / "sft") == _weights(ref / "sft")


def test_calibrate_killed_during_sft_then_clean_rerun(calib, tmp_path):
    out = tmp_path / "run"
    _kill_when(_start(["calibrate", str(calib["cfg"]), "--out", str(out)]), _in_sft(out), "calibrate SFT")
    assert not out.exists()
    assert bai_cli.main(["calibrate", str(calib["cfg"]), "--out", str(out)]) == 0
    assert _hidden(tmp_path) == []
    assert json.loads((out / "report.json").read_text())["sft"]["reused"] is False
    _same_as_ref(out, calib["ref"])


def test_calibrate_killed_during_search_resumes_after_sft(calib, tmp_path):
    out = tmp_path / "run"
    _kill_when(_start(["calibrate", str(calib["cfg"]), "--out", str(out)], slowdown=0.1), _in_search(out),
               "calibrate search")
    assert not out.exists()
    assert bai_cli.main(["calibrate", str(calib["cfg"]), "--out", str(out)]) == 0
    assert _hidden(tmp_path) == []
    assert json.loads((out / "report.json").read_text())["sft"]["reused"] is True    # the finished SFT was adopted
    assert not any((out / ".probes").iterdir())
    _same_as_ref(out, calib["ref"])


def test_calibrate_force_killed_keeps_old_run_then_replaces_it(calib, tmp_path):
    """--force onto its own earlier run: a killed attempt leaves the old run as it was; a
    complete one replaces it."""
    out = tmp_path / "run"
    shutil.copytree(calib["ref"], out)
    (out / "stale.txt").write_text("from the earlier run")
    before = _tree(out)
    _kill_when(_start(["calibrate", str(calib["cfg"]), "--out", str(out), "--force"]), _in_sft(out),
               "calibrate --force")
    assert _tree(out) == before
    assert bai_cli.main(["calibrate", str(calib["cfg"]), "--out", str(out), "--force"]) == 0
    assert not (out / "stale.txt").exists() and _hidden(tmp_path) == []
    _same_as_ref(out, calib["ref"])
