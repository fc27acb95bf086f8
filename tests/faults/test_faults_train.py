"""Fault suite for `rlhf train` (issue 12 point 7): SIGKILL of each worker kind and of the driver
in the middle of a checkpoint write, each followed by an in-run restart or a `--resume` whose
per-step metrics and probes equal one uninterrupted reference run's (shared by the tests).

The driver runs as a subprocess joined to this module's local Ray cluster, so the killed worker
processes are descendants of this test process (``rlhf_faults.worker_pids``); nothing else on
the machine is touched. The plain driver SIGKILL at a random step is
``tests/rlhf/test_trainer.py::test_sigkill_then_resume_matches_uninterrupted_run``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf.config import load_config
from rlhf.trainer import NON_DETERMINISTIC_PREFIXES, train

pytestmark = pytest.mark.slow

STEPS = 8
COMMON = ["trainer.save_every=2", "trainer.probe_every=2", "data.num_builtin=64", f"trainer.total_steps={STEPS}"]
SUPPORT = Path(__file__).resolve().parents[1] / "support"
KILLS = [["ActorWorker"], ["CriticWorker"], ["ReferenceWorker", "RewardWorker"], ["RolloutWorker"]]
"""Worker kinds SIGKILLed together, one restart each (the two frozen scorers share one)."""


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _deterministic(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if not k.startswith(NON_DETERMINISTIC_PREFIXES)}


def assert_same_run(got: Path, want: Path) -> None:
    """Per-step metrics (timings aside) and probe records equal, each step exactly once."""
    g, w = [_deterministic(r) for r in _jsonl(got / "metrics.jsonl")], [_deterministic(r) for r in _jsonl(want / "metrics.jsonl")]
    assert [r["step"] for r in g] == list(range(1, STEPS + 1))
    for a, b in zip(g, w):
        assert a == b, (a["step"], {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)})
    gp, wp = _jsonl(got / "probes.jsonl"), _jsonl(want / "probes.jsonl")
    assert [r["step"] for r in gp] == list(range(2, STEPS + 1, 2))  # no duplicate probe steps
    assert gp == wp
    assert not list((got / "checkpoints").glob(".tmp_step_*"))



@pytest.fixture(scope="module")
def reference(ray_address, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("faults") / "ref"
    train(load_config(None, COMMON + [f"run_dir={run_dir}"]))
    return run_dir


def _driver(run_dir: Path, ray_address: str, *extra: str, runner: list[str] | None = None, stderr=None):
    cmd = [sys.executable, *(runner or ["-m", "rlhf.cli"]), "train", *COMMON, f"run_dir={run_dir}",
           f"cluster.address={ray_address}", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr or subprocess.PIPE, text=True)


def test_local_ray_listens_on_loopback_only(ray_address, reference):
    """Every Ray listener (GCS, raylet, agents, the workers' and drivers' core-worker ports) of a local
    cluster started as `rlhf train` starts it is on 127.0.0.1. Checked: this process and every process
    of this module's Ray session (those whose command line names its session directory, and all
    below them); processes left over from other test modules' clusters are not this cluster's. Not
    checked: the actor / critic processes (and children holding their fds), whose torch.distributed
    rendezvous store binds every interface (torch has no bind-address option for it)."""
    import gc

    import ray

    from rlhf_faults import descendants, listening_sockets

    # an in-process process group of an earlier test (``rlhf sft`` run in this process) whose
    # TCPStore sits in a reference cycle listens on every interface until the cyclic GC frees it:
    # not this cluster's listener
    gc.collect()
    assert ray_address.startswith("127.0.0.1:"), ray_address
    session = ray._private.worker._global_node.get_session_dir_path()
    roots = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and session.encode() in (d / "cmdline").read_bytes():
                roots.append(int(d.name))
        except OSError:
            continue
    pids = {os.getpid(), *roots, *(c for r in roots for c in descendants(r))}
    exempt = ("ray::ActorWorker", "ray::CriticWorker")  # also their forked children holding the store's fd
    socks = [s for s in listening_sockets(sorted(pids))
             if not any(name.startswith(exempt) for name in s[2].split(" | "))]
    assert any("gcs_server" in s[2] for s in socks) and any("raylet" in s[2] for s in socks), socks
    outside = sorted({s for s in socks if s[0] not in ("127.0.0.1", "::1")})
    assert not outside, outside


def test_sigkill_of_each_worker_kind_restarts_exactly(reference, ray_address, tmp_path):
    """Actor, critic, reference + reward, and rollout workers are SIGKILLed in turn in one run; every
    death restarts all workers from the last checkpoint and the run ends as the uninterrupted one did."""
    from rlhf_faults import kill_worker

    run_dir, err_path = tmp_path / "killed", tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = _driver(run_dir, ray_address, f"trainer.max_restarts={len(KILLS)}", stderr=err)
        metrics, killed = run_dir / "metrics.jsonl", []
        try:
            for k, kinds in enumerate(KILLS):
                deadline, since = time.time() + 300, None
                while time.time() < deadline and proc.poll() is None:
                    restarts = err_path.read_text().count("from the last checkpoint")
                    if restarts == k and since is None:
                        since = time.time()  # the restart's truncation of metrics.jsonl comes after this
                    if (since is not None and metrics.exists() and (run_dir / "checkpoints" / "latest").exists()
                            and (k == 0 or metrics.stat().st_mtime > since)
                            and len(metrics.read_text().splitlines()) >= 2 + k):
                        break
                    time.sleep(0.02)
                assert proc.poll() is None, f"run ended before the {kinds} kill: {err_path.read_text()[-3000:]}"
                killed += [kill_worker(os.getpid(), cls, exclude=killed) for cls in kinds]
            rc = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
    err = err_path.read_text()
    assert rc == 0, err[-3000:]
    assert err.count("from the last checkpoint") == len(KILLS), err[-3000:]
    for kinds in KILLS:
        assert any(f"class_name: {cls}" in err for cls in kinds), kinds  # each death names its worker
    assert_same_run(run_dir, reference)


def test_sigkill_during_checkpoint_write_then_exact_resume(reference, ray_address, tmp_path):
    """The driver dies half-way through writing checkpoint 6: ``latest`` still names step 4, the
    temporary is removed at the resume, and the resumed run equals the uninterrupted one."""
    run_dir = tmp_path / "ckpt"
    proc = _driver(run_dir, ray_address, runner=[str(SUPPORT / "kill_in_checkpoint.py"), "6"])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -9, err[-3000:]
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000004"
    assert (ckpts / ".tmp_step_000006" / "actor").is_dir()  # killed mid-write
    assert len(_jsonl(run_dir / "metrics.jsonl")) == 6 and len(_jsonl(run_dir / "probes.jsonl")) == 3
    resumed = subprocess.run([sys.executable, "-m", "rlhf.cli", "train", "--resume", str(run_dir),
                              f"cluster.address={ray_address}"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.strip().splitlines()[-1].startswith(f"rlhf train: wrote {run_dir}")
    assert_same_run(run_dir, reference)
    (rec,) = _jsonl(run_dir / "resumes.jsonl")
    assert rec["from"] == "step_000004" and rec["overrides"] == [f"cluster.address={ray_address}"]
