"""`rlhf train` with ``ppo.async_rollout`` (issue 16.5) on the tiny CPU config: step 0 generates
synchronously (staleness 0, the exact rollout check), every later batch is one actor update stale
and was sampled by the pre-update weights (its rollout logprobs are the previous checkpoint's
actor's, not the current one's); a run stopped and resumed logs the uninterrupted async run's
metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf.config import load_config
from rlhf.trainer import NON_DETERMINISTIC_PREFIXES, train
from rlhf.workers.async_rollout import PENDING_FILE

ARGS = ["ppo.async_rollout=true", "ppo.tis_cap=2.0", "trainer.probe_every=0", "data.num_builtin=32",
        "trainer.save_every=1"]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _logprobs(model_dir: Path, gens: list[dict]) -> list[torch.Tensor]:
    """Per generation, the logprobs of its response tokens under the HF model in ``model_dir``
    (temperature 1, no filtering: the tiny config's sampling)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for g in gens:
            ids = torch.tensor([g["prompt_ids"] + g["response_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            P, r = len(g["prompt_ids"]), torch.tensor(g["response_ids"])
            out.append(logp[P - 1:P - 1 + len(r)].gather(-1, r[:, None]).squeeze(-1))
    return out


def _max_gap(model_dir: Path, gens: list[dict]) -> float:
    got = _logprobs(model_dir, gens)
    return max(float((a - torch.tensor(g["logprobs"])).abs().max()) for a, g in zip(got, gens))


@pytest.mark.slow  # starts Ray (the marker's meaning in pyproject.toml); ~60 s
def test_async_batches_come_from_the_pre_update_weights(ray_address, tmp_path):
    run_dir = tmp_path / "run"
    train(load_config(None, ARGS + [f"run_dir={run_dir}", "trainer.total_steps=2"]))
    recs = _records(run_dir)
    assert [r["step"] for r in recs] == [1, 2]
    assert [r["rollout/staleness"] for r in recs] == [0.0, 1.0]
    assert recs[0]["kl/rollout_vs_trainer"] < 1e-3                     # step 0: same weights, exact check
    assert recs[1]["kl/rollout_vs_trainer"] > 10 * recs[0]["kl/rollout_vs_trainer"]   # now also staleness
    ck = run_dir / "checkpoints"
    p1 = json.loads((ck / "step_000001" / PENDING_FILE).read_text())
    p2 = json.loads((ck / "step_000002" / PENDING_FILE).read_text())
    assert (p1["step"], p1["version"], p2["step"], p2["version"]) == (1, 0, 2, 1)
    # the batch trained on at step 2 (p1) was sampled by the initial weights, not by step 1's update
    init = run_dir / "models" / "tiny_actor"
    assert _max_gap(init, p1["gens"]) < 1e-4
    assert _max_gap(ck / "step_000001" / "actor", p1["gens"]) > 1e-3
    # ... and the batch generated during step 2 (for step 3) by step 1's weights
    assert _max_gap(ck / "step_000001" / "actor", p2["gens"]) < 1e-4
    assert _max_gap(ck / "step_000002" / "actor", p2["gens"]) > 1e-3


STEPS = 5


@pytest.fixture(scope="module")
def whole(ray_address, tmp_path_factory):
    """The uninterrupted async run the interrupted ones must equal."""
    run_dir = tmp_path_factory.mktemp("async") / "whole"
    train(load_config(None, ARGS + [f"run_dir={run_dir}", f"trainer.total_steps={STEPS}"]))
    return run_dir


def _assert_same_run(got: Path, want: Path) -> None:
    g, w = _records(got), _records(want)
    assert [r["step"] for r in g] == [r["step"] for r in w] == list(range(1, STEPS + 1))
    assert [r["rollout/staleness"] for r in g] == [0.0] + [1.0] * (STEPS - 1)
    for a, b in zip(g, w):
        keys = {k for k in b if not k.startswith(NON_DETERMINISTIC_PREFIXES)}
        assert keys == {k for k in a if not k.startswith(NON_DETERMINISTIC_PREFIXES)}
        off = {k: (a[k], b[k]) for k in keys
               if isinstance(b[k], float) and abs(a[k] - b[k]) > 1e-6 * max(1.0, abs(b[k]))}
        assert not off, (a["step"], off)


@pytest.mark.slow
def test_async_stopped_and_resumed_run_matches_uninterrupted(whole, tmp_path):
    """Stopped at the end of step 2 (its checkpoint holds the batch generated ahead for step 3),
    then ``--resume`` with a larger ``trainer.total_steps``."""
    parts = tmp_path / "parts"
    train(load_config(None, ARGS + [f"run_dir={parts}", "trainer.total_steps=2"]))
    train(load_config(parts / "config.yaml", [f"run_dir={parts}", f"trainer.total_steps={STEPS}"]), resume=True)
    _assert_same_run(parts, whole)


@pytest.mark.slow
def test_async_rollout_worker_death_restarts_exactly(whole, ray_address, tmp_path):
    """SIGKILL of the rollout worker (which holds the in-flight generation) in a running driver: the
    workers restart from the last checkpoint, its pending batch replaces the lost generation, and
    the run ends as the uninterrupted one."""
    import os
    import subprocess
    import sys
    import time

    from rlhf_faults import kill_worker

    run_dir, err_path = tmp_path / "killed", tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "rlhf.cli", "train", *ARGS, f"run_dir={run_dir}", f"trainer.total_steps={STEPS}",
           f"cluster.address={ray_address}", "trainer.max_restarts=1"]
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            deadline, metrics = time.time() + 300, run_dir / "metrics.jsonl"
            while time.time() < deadline and proc.poll() is None:
                if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                    break
                time.sleep(0.02)
            assert proc.poll() is None, err_path.read_text()[-3000:]
            kill_worker(os.getpid(), "RolloutWorker")
            rc = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = err_path.read_text()
    assert rc == 0, text[-3000:]
    assert text.count("from the last checkpoint") == 1, text[-3000:]
    _assert_same_run(run_dir, whole)


@pytest.mark.slow
def test_async_rollback_replays_the_checkpointed_pending_batch(ray_address, tmp_path):
    """A rollback (``metrics.on_collapse_warning=rollback``, kl change) with async on drops the
    in-flight generation and replays the restored checkpoint's pending batch: the replayed step
    trains on the very batch the abandoned step had (same length and reward), one update stale."""
    run_dir = tmp_path / "run"
    args = ["ppo.async_rollout=true", "ppo.tis_cap=2.0", "reward.function=rlhf.rewards:short_answer",
            "trainer.save_every=1", "trainer.probe_every=0", "data.num_builtin=64", "trainer.total_steps=10",
            "metrics.baseline_steps=2", "metrics.smooth_window=3", "metrics.warn_smooth_window=1",
            "metrics.warn_persistence=1", "metrics.warn_reward_corr=1.0", "metrics.on_collapse_warning=rollback",
            "metrics.rollback_change=kl",
            "metrics.rollback_max=1", "ppo.kl_coef=0.01", f"run_dir={run_dir}"]
    train(load_config(None, args))
    events = [json.loads(x) for x in (run_dir / "stability_events.jsonl").read_text().splitlines()]
    rb = next(e for e in events if e.get("action") == "rollback")
    R, W = rb["restored_step"], rb["fired_at"]
    assert R == W - 1
    kept = {r["step"]: r for r in _records(run_dir / "rollback" / f"01_step_{W:06d}")}
    recs = {r["step"]: r for r in _records(run_dir)}
    assert sorted(recs) == list(range(1, 11))
    assert recs[W]["rollout/staleness"] == kept[W]["rollout/staleness"] == 1.0
    for k in ("rollout/length_mean", "reward/mean"):            # the same batch as the abandoned step W
        assert recs[W][k] == kept[W][k], k
    assert recs[W]["kl/coef"] == pytest.approx(2 * kept[W]["kl/coef"])
    assert all((run_dir / "checkpoints" / f"step_{s:06d}" / PENDING_FILE).exists()
               for s in (R, 10) if (run_dir / "checkpoints" / f"step_{s:06d}").exists())
