"""Actions on a verdict inside `rlhf train` (``metrics.on_*``, ``rlhf.metrics.actions``): a tiny run
whose reward prefers short answers (``rlhf.rewards:short_answer``) collapses its length; with
``metrics.on_collapse_warning=stop`` it stops at the warning with a checkpoint of that step and the
action recorded, and ``--resume`` continues it to the end without firing again."""

from __future__ import annotations

import json
import shutil

import pytest

from rlhf.config import load_config
from rlhf.trainer import RunStopped, latest_checkpoint, train

pytestmark = pytest.mark.slow

ARGS = ["reward.function=rlhf.rewards:short_answer", "trainer.save_every=0", "trainer.probe_every=0",
        "data.num_builtin=64", "trainer.total_steps=14", "metrics.baseline_steps=2", "metrics.smooth_window=3",
        "metrics.warn_smooth_window=1", "metrics.warn_persistence=1", "metrics.on_collapse_warning=stop",
        "metrics.warn_reward_corr=1.0"]   # the length path only: the warning comes after a few steps to roll back into


def test_stop_on_collapse_warning_then_resume(ray_address, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(RunStopped, match="collapse_warning -> warned at step .*metrics.on_collapse_warning = stop"):
        train(load_config(None, ARGS + [f"run_dir={run_dir}"]))
    events = [json.loads(x) for x in (run_dir / "stability_events.jsonl").read_text().splitlines()]
    (act,) = [e for e in events if "action" in e]
    step = act["step"]
    assert act["action"] == "stop" and act["trigger"] == "collapse_warning" and 1 < step < 14
    assert latest_checkpoint(run_dir).name == f"step_{step:06d}"
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == step and recs[-1]["stability/collapse_warning"] == 1.0
    bias = sorted(r["advantage/length_corr"] for r in recs[-3:])[1]   # median of 3 (metrics.smooth_window)
    assert bias <= -0.2                                  # the update prefers short answers: the indicator

    train(load_config(run_dir / "config.yaml", [f"run_dir={run_dir}"]), resume=True)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 15))
    events = [json.loads(x) for x in (run_dir / "stability_events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "action" in e] == [step]   # latched: no second stop


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_rollback_merge_then_resume_after_rollback(ray_address, tmp_path):
    """``metrics.on_collapse_warning=rollback`` with ``rollback_change=merge``: at the warning the run
    goes back to the last checkpoint before it, re-merges the actor with the initial (tiny) actor
    through ``bai.merge`` and trains on; the warning fires again on the new path and falls back to
    ``log`` (``rollback_max`` 1). A run killed right after the rollback (only the rewritten
    checkpoint left) resumes with the merged weights and the count, and repeats the same steps."""
    import torch
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    args = [a for a in ARGS if not a.startswith(("trainer.save_every", "metrics.on_collapse_warning",
                                                 "trainer.total_steps"))]
    args += ["trainer.save_every=2", "trainer.total_steps=12", "metrics.on_collapse_warning=rollback",
             "metrics.rollback_change=merge", "metrics.rollback_merge_ratio=0.5", f"run_dir={run_dir}"]
    train(load_config(None, args))
    events = _jsonl(run_dir / "stability_events.jsonl")
    (rb,) = [e for e in events if e.get("action") == "rollback"]
    R, W = rb["restored_step"], rb["fired_at"]
    assert rb["step"] == R and R == (W - 1) // 2 * 2 and R >= 2 and rb["trigger"] == "collapse_warning"
    assert rb["change"]["kind"] == "merge" and rb["change"]["ratio"] == 0.5 and rb["rollback"] == 1
    assert rb["change"]["base"] == str(run_dir / "models" / "tiny_actor")
    assert f"rolled back to step_{R:06d}" in rb["reason"]
    recs = _jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 13))          # the abandoned steps were cut
    kept = run_dir / "rollback" / f"01_step_{W:06d}"
    assert [r["step"] for r in _jsonl(kept / "metrics.jsonl")][-1] == W   # ...and kept aside
    after = [e for e in events if "action" in e and e["step"] > R]
    assert all(e["action"] == "log" and "metrics.rollback_max = 1" in e["reason"] for e in after)
    # the merge: ratio 0.5 of the base (tiny actor) and the restored actor, and what the engine held
    def weights(d):
        return {k: v.float() for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    merged, base = weights(kept / "actor"), weights(run_dir / "models" / "tiny_actor")
    saved = weights(run_dir / "checkpoints" / f"step_{R:06d}" / "actor")   # the rewritten step_R: the engine's
    name = next(k for k in base if k.endswith("q_proj.weight"))
    assert not torch.equal(merged[name], base[name]) and torch.allclose(saved[name], merged[name])

    # killed right after the rollback: only the rewritten step_R is left
    full = {r["step"]: r for r in recs}
    ckpts = run_dir / "checkpoints"
    state = json.loads((ckpts / f"step_{R:06d}" / "trainer_state.json").read_text())
    assert [r["rollback"] for r in state["rollbacks"]] == [1]
    for p in ckpts.glob("step_*"):
        if int(p.name[5:]) > R:
            shutil.rmtree(p)
    (ckpts / "latest").write_text(f"step_{R:06d}")
    train(load_config(run_dir / "config.yaml", [f"run_dir={run_dir}"]), resume=True)
    again = _jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in again] == list(range(1, 13))
    for r in again[R:]:                                              # the same path as before the kill
        for k in ("rollout/length_mean", "reward/mean", "kl/coef"):
            assert r[k] == pytest.approx(full[r["step"]][k], rel=1e-4, abs=1e-6), (r["step"], k)
    events = _jsonl(run_dir / "stability_events.jsonl")
    assert [e["rollback"] for e in events if e.get("action") == "rollback"] == [1]   # no second rollback


@pytest.mark.parametrize("change", ["kl", "lr"])
def test_rollback_kl_or_lr_end_to_end(ray_address, tmp_path, change):
    """``rollback_change=kl`` / ``lr`` in a real run: the run goes back to the checkpoint before the
    warning (one a step here), the KL coefficient (x 2) or both learning rates (x 0.5) change from
    there on, and the replayed step right after it, sampled by the restored weights, does not roll
    back again even with ``rollback_max`` 3 (its firing is logged, not acted on)."""
    run_dir = tmp_path / "run"
    args = [a for a in ARGS if not a.startswith(("trainer.save_every", "metrics.on_collapse_warning",
                                                 "trainer.total_steps"))]
    args += ["trainer.save_every=1", "trainer.total_steps=10", "metrics.on_collapse_warning=rollback",
             f"metrics.rollback_change={change}", "metrics.rollback_max=3", "ppo.kl_coef=0.01", f"run_dir={run_dir}"]
    train(load_config(None, args))
    events = _jsonl(run_dir / "stability_events.jsonl")
    rbs = [e for e in events if e.get("action") == "rollback"]
    assert rbs, events
    R, W = rbs[0]["restored_step"], rbs[0]["fired_at"]
    assert R == W - 1 and rbs[0]["change"]["kind"] == change
    assert all(e["restored_step"] != R or e["fired_at"] > R + 1 for e in rbs[1:])   # never the replay
    replay = [e for e in events if e.get("action") == "log" and e["step"] == R + 1]
    for e in replay:
        assert "replayed from the rollback to step" in e["reason"]
    recs = {r["step"]: r for r in _jsonl(run_dir / "metrics.jsonl")}
    assert sorted(recs) == list(range(1, 11))
    end = rbs[1]["restored_step"] if len(rbs) > 1 else 10
    if change == "kl":
        k0 = recs[R]["kl/coef"]
        assert rbs[0]["change"]["kl_coef"] == pytest.approx([k0, 2 * k0])
        assert all(recs[s]["kl/coef"] == pytest.approx(2 * k0) for s in range(R + 1, end + 1))
    else:
        for role in ("actor", "critic"):
            lr0 = recs[R][f"{role}/lr"]
            assert all(recs[s][f"{role}/lr"] == pytest.approx(0.5 * lr0) for s in range(R + 1, end + 1)), role
    state = json.loads((run_dir / "checkpoints" / "step_000010" / "trainer_state.json").read_text())
    assert [r["rollback"] for r in state["rollbacks"]] == list(range(1, len(rbs) + 1))   # kept for --resume
