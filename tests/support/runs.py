"""Test support: one in-process ``rlhf train`` run on a fresh local Ray, its metrics read back, and
a ``rlhf train`` subprocess killed with SIGKILL once it has checkpointed, then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def run_train(cfg, num_cpus: int = 4) -> list[dict]:
    """Start a local Ray (``num_cpus`` CPUs, no dashboard), run ``rlhf.trainer.train(cfg)``, shut
    Ray down (also on failure) and return the records of ``<cfg.run_dir>/metrics.jsonl``, one per step."""
    import ray

    from rlhf.trainer import train

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        train(cfg)
    finally:
        ray.shutdown()
    return [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]


def kill_then_resume(train_args: list[str], run_dir: Path, ray_address: str, total: int, after: int = 6,
                     timeout: float = 300) -> int:
    """Run ``rlhf train TRAIN_ARGS run_dir=RUN_DIR trainer.total_steps=TOTAL`` on the Ray cluster at
    ``ray_address``, SIGKILL it once a checkpoint exists and ``after`` steps are logged, then
    ``rlhf train --resume RUN_DIR`` to the end. Returns the number of steps logged at the kill
    (asserted to be before the end); the resumed run must exit 0."""
    cmd = [sys.executable, "-m", "rlhf.cli", "train", *train_args, f"run_dir={run_dir}",
           f"trainer.total_steps={total}", f"cluster.address={ray_address}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed_at, deadline = None, time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        if (run_dir / "checkpoints" / "latest").exists() and metrics.exists():
            lines = metrics.read_text().splitlines()
            if len(lines) >= after:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = len(lines)
                break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed_at is not None, f"run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    assert killed_at < total
    resumed = subprocess.run([sys.executable, "-m", "rlhf.cli", "train", "--resume", str(run_dir),
                              f"cluster.address={ray_address}"], capture_output=True, text=True,
                             timeout=timeout + 100)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return killed_at
