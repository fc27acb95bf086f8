"""Rollback on a detector's verdict (``metrics.on_*: rollback``): back to the last checkpoint
before the warning, then on with a changed KL coefficient, learning rates, or the actor merged
with its base (``bai.merge``, an online BAI). The trainer's loop calls ``check_rollback`` before
any work, ``roll_back`` when ``rlhf.metrics.actions`` picks one, and ``relog_rollbacks`` on resume;
the worker side is ``_TrainableBase.scale_lr`` / ``rebuild``."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from bairlhf.outputs import atomic_write
from rlhf.config import ConfigError, PPOConfig

ROLLBACK_DIR = "rollback"
"""``run_dir/rollback/NN_step_W/``: the run files as they were when rollback NN fired at step W
(``metrics.jsonl``, ``stability_events.jsonl``, ``probes.jsonl``) and a ``merge`` rollback's actor."""
SWITCHES = ("on_collapse_warning", "on_collapse", "on_hockey_stick_warning", "on_hockey_stick")


def check_rollback(cfg: PPOConfig) -> None:
    """Refuse, before any work, a ``metrics.on_*: rollback`` the run cannot carry out."""
    m = cfg.metrics
    keys = [k for k in SWITCHES if getattr(m, k) == "rollback"]
    if not keys:
        return
    if cfg.trainer.save_every == 0:
        raise ConfigError(f"metrics.{keys[0]}: rollback goes back to the last checkpoint before the warning, "
                          "and trainer.save_every = 0 saves none; set trainer.save_every >= 1")
    if m.rollback_change == "kl" and cfg.ppo.kl_coef == 0:
        raise ConfigError("metrics.rollback_kl_factor: ppo.kl_coef is 0, so multiplying it changes nothing; "
                          "set ppo.kl_coef > 0 or choose another metrics.rollback_change")
    if m.rollback_change == "merge" and cfg.engine.actor == "megatron":
        raise ConfigError("metrics.rollback_change: merge re-initializes the actor's DeepSpeed engine in place, "
                          "which engine.actor = megatron does not support; use kl or lr")


def rollback_base(cfg: PPOConfig, run_dir: Path) -> str:
    """The base model a ``merge`` rollback merges the actor with: the BAI recipe's ``base`` when
    the run starts from a ``model.bai_recipe`` that names one (the pre-BAI base), else the run's
    initial actor (``model.actor``, the tiny actor, or the recipe's merge)."""
    from rlhf.trainer import model_paths

    if cfg.model.bai_recipe is not None:
        from bai.config import load_config as load_merge_config

        base = load_merge_config(cfg.model.bai_recipe).base
        if base is not None:
            return str(base)
    return model_paths(cfg, run_dir).actor


def roll_back(cfg: PPOConfig, w, state, run_dir: Path, tok, logger, act: dict):
    """Carry out the due rollback ``act`` (``rlhf.metrics.actions.pick_rollback``); returns the new
    ``MetricLogger`` (the old one is closed).

    Keeps the run files in ``rollback/NN_step_W``, drops any checkpoint after the restored step R,
    restores the workers and the loop state from ``step_R``, applies ``metrics.rollback_change``,
    syncs the rollout engine, writes ``step_R`` again (the change and the rollback count in its
    trainer state, so a resume keeps them), cuts the run files back to R and records the rollback."""
    from bai.merge import merge

    from rlhf.metrics import MetricLogger
    from rlhf.trainer import COMMAND, checkpoint_steps, fetch, restore, save_checkpoint, sync_weights
    from rlhf.metrics.actions import lr_factor, rollback_change, rollback_record
    from rlhf.metrics.logger import EVENTS_FILE, METRICS_FILE, truncate_jsonl

    m, R, W = cfg.metrics, int(act["restored_step"]), int(act["fired_at"])
    done = list(state.rollbacks)
    n = len(done) + 1
    keep = run_dir / ROLLBACK_DIR / f"{n:02d}_step_{W:06d}"
    keep.mkdir(parents=True, exist_ok=True)
    logger.close()
    for name in (METRICS_FILE, EVENTS_FILE, "probes.jsonl"):
        if (run_dir / name).exists():
            shutil.copy(run_dir / name, keep / name)
    root = run_dir / "checkpoints"
    ckpt = root / f"step_{R:06d}"
    atomic_write(root / "latest", ckpt.name)  # first: a kill from here on resumes from step R
    for s in checkpoint_steps(run_dir):
        if s > R:  # none is expected (no save at the firing step), but never resume the abandoned steps
            shutil.rmtree(root / f"step_{s:06d}", ignore_errors=True)
    restore(w, state, ckpt, cfg)  # with ppo.async_rollout: the checkpoint's pending batch, not the in-flight one
    state.rollbacks = done  # the count is the run's, not the checkpoint's
    change = rollback_change(m, state.kl_coef, rollback_base(cfg, run_dir) if m.rollback_change == "merge" else None)
    if change["kind"] == "kl":
        state.kl_coef = change["kl_coef"][1]
    elif change["kind"] == "lr":
        lrs = fetch([x.scale_lr.remote(change["factor"]) for x in [*w.actor, *w.critic]])
        change["actor_lr"] = lrs[0][0]
        if w.critic:
            change["critic_lr"] = lrs[len(w.actor)][0]
    else:
        r = change["ratio"]
        out = keep / "actor"
        merge({"method": "linear", "dtype": "float32", "models": [
            {"path": str(ckpt / "actor"), "weight": 1.0 - r}, {"path": change["base"], "weight": r}]},
            out, force=True, progress=False)
        change["merged"] = str(out.relative_to(run_dir))
        fetch([a.rebuild.remote(str(out)) for a in w.actor])
        f = lr_factor(done)  # earlier lr rollbacks hold on in the fresh optimizer
        if f != 1.0:
            fetch([a.scale_lr.remote(f) for a in w.actor])
    sync_weights(w)
    rec = rollback_record(act, change, n, ckpt.name)
    state.rollbacks = done + [rec]
    save_checkpoint(cfg, w, state, run_dir, tok)  # step_R again, now with the change
    truncate_jsonl(run_dir / "probes.jsonl", R)
    logger = MetricLogger(run_dir, resume_step=R, monitor=state.monitor, loggers=cfg.trainer.loggers)
    logger.log_events([rec])
    print(f"[{COMMAND}] {rec['reason']}", file=sys.stderr)
    return logger


def relog_rollbacks(logger, state) -> None:
    """Append the restored state's rollback records that ``stability_events.jsonl`` lacks (a run
    killed between writing the rolled-back checkpoint and its record)."""
    from rlhf.metrics.logger import read_jsonl

    have = {e.get("rollback") for e in read_jsonl(logger.events_path) if e.get("action") == "rollback"}
    missing = [r for r in state.rollbacks if r["rollback"] not in have and r["step"] <= state.step]
    if missing:
        logger.log_events(missing)
