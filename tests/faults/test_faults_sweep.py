"""Faults of `rlhf sweep` (issue 12, point 7): the sweep driver SIGKILLed in the middle of its
runs, then the same command again: it resumes into its own OUT and completes, every point's
metrics hold each step once, and nothing of the killed process is left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TOTAL = 4


@pytest.fixture(scope="module")
def ray_address():
    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _steps(run_dir: Path) -> list[int]:
    f = run_dir / "metrics.jsonl"
    return [json.loads(ln)["step"] for ln in f.read_text().splitlines() if ln.strip()] if f.exists() else []


@pytest.mark.slow
def test_sigkill_mid_sweep_then_rerun_completes(tmp_path, tiny_family, ray_address):
    out = tmp_path / "sweep"
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump({
        "out": str(out), "ppo_config": str(ROOT / "configs" / "ppo" / "tiny_cpu.yaml"),
        "overrides": [f"trainer.total_steps={TOTAL}", "trainer.save_every=2", "trainer.probe_every=0",
                      "ppo.rollout_batch_size=8", "ppo.mini_batch_size=8", "ppo.micro_batch_size=8",
                      "ppo.ppo_epochs=1", "rollout.max_new_tokens=8"],
        "merge": {"method": "bai", "base": str(tiny_family["base"]), "dtype": "float32", "alphas": [0.2, 0.8],
                  "sft_models": [{"path": str(tiny_family["sft_a"]), "weight": 0.5},
                                 {"path": str(tiny_family["sft_b"]), "weight": 0.5}]},
    }))
    cmd = [sys.executable, "-m", "rlhf.cli", "sweep", str(f), f"cluster.address={ray_address}"]
    first, second = out / "runs" / "alpha_0.2", out / "runs" / "alpha_0.8"
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if (first / "checkpoints" / "latest").exists() and len(_steps(first)) >= 2 and not (first / "SWEEP_DONE").exists():
            killed = "first point mid-run"
        elif second.exists() and not (second / "SWEEP_DONE").exists():
            killed = "second point started"
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed is not None, f"sweep ended before it could be killed: {proc.stderr.read()[-3000:]}"
    assert not (out / "summary.md").exists()
    assert sum((out / "runs" / p / "SWEEP_DONE").exists() for p in ("alpha_0.2", "alpha_0.8")) < 2

    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (killed, again.stderr[-4000:])
    assert again.stdout.strip().splitlines()[-1].startswith("rlhf sweep: ran ")
    assert str(out / "summary.md") in again.stdout.strip().splitlines()[-1]
    for run in (first, second):
        assert (run / "SWEEP_DONE").exists(), run
        assert _steps(run) == list(range(1, TOTAL + 1)), (killed, run, _steps(run))
    summary = (out / "summary.md").read_text()
    assert "| | α=0.2, β=0.8 | α=0.8, β=0.2 |" in summary
    assert (out / "report" / "summary.md").exists() and (out / ".bai-rlhf-output.json").exists()
    leftovers = [p.name for p in [*tmp_path.iterdir(), *out.iterdir()] if ".tmp" in p.name or ".old-" in p.name]
    assert leftovers == [], leftovers
