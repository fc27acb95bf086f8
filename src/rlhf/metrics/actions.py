"""Actions on a detector's verdict: one config switch per detector (``metrics.on_*``).

    metrics.on_collapse_warning       the collapse warning is raised     (detector collapse_warning -> warned)
    metrics.on_collapse               a length collapse is detected      (length_collapse -> collapsed)
    metrics.on_hockey_stick_warning   the reward-decline warning         (hockey_stick_warning -> warned)
    metrics.on_hockey_stick           a decline is classed hockey stick  (hockey_stick -> hockey_stick/*)

Each is ``log`` (default: the event is recorded, nothing else), ``checkpoint`` (a checkpoint is
saved at that step, so the state at the warning can be studied or resumed with other settings),
``stop`` (a checkpoint is saved and the run ends cleanly: exit code 1 and the reason on stderr;
``rlhf train --resume RUN_DIR`` continues it, the detector does not fire again) or ``rollback``.
Every action taken is appended to ``stability_events.jsonl`` as ``{"step", "action", "trigger",
"to", "reason"}`` and reaches TensorBoard text; the file is cut back with the run on resume.

``rollback``: the run goes back to the last checkpoint saved before the firing step (the event's
step, or the onset step of its evidence when earlier: a collapse or a decline began before it was
detected) and trains on from there with one change, ``metrics.rollback_change``:

    kl      the KL coefficient x ``rollback_kl_factor`` from then on
    lr      actor and critic learning rates x ``rollback_lr_factor`` from then on
    merge   the actor re-initialized as ``ratio x base + (1 - ratio) x restored actor`` (``bai.merge``,
            method ``linear``, ratio ``rollback_merge_ratio``): an online BAI, the adaptive merging
            of the BAI paper (A.4). The base is the BAI recipe's ``base`` when the run was started
            from a ``model.bai_recipe`` that has one, else the run's initial actor (``model.actor``,
            the tiny actor, or the recipe's merge). The merged model is written to
            ``rollback/NN_step_W/actor``; the actor's optimizer restarts there (fresh AdamW
            moments, the LR warm-up runs again); the reference model stays as it was.

The workers, the loop state (data position, KL coefficient, RNG) and the detectors' state are
those of the checkpoint; ``metrics.jsonl``, ``stability_events.jsonl`` and ``probes.jsonl`` are cut
back to its step (as a resume does; the abandoned records are kept in ``rollback/NN_step_W/``),
the rollout engine gets the restored (or merged) weights, and the checkpoint is written again with
the change and the rollback count in its trainer state, so ``--resume`` keeps both. The rollback
is recorded at the restored step (it survives the cut) as ``{"step": R, "action": "rollback",
"trigger", "to", "fired_at": W, "restored_step": R, "change": {...}, "rollback": n, "reason"}``.
At most ``metrics.rollback_max`` rollbacks run per run; past that, or with no checkpoint before
the firing step, the switch does ``metrics.rollback_fallback`` (log, checkpoint or stop) instead,
with the reason saying why. A ``stop`` due at the same step wins over a rollback.

Pure: imports no torch, Ray or engines; the trainer passes a ``save`` callback and runs the
rollback itself (``rlhf.trainer.roll_back``) from ``pick_rollback`` and ``rollback_record``.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping

TRIGGERS: dict[str, tuple[str, Callable[[str], bool]]] = {
    "collapse_warning": ("on_collapse_warning", lambda to: to == "warned"),
    "length_collapse": ("on_collapse", lambda to: to == "collapsed"),
    "hockey_stick_warning": ("on_hockey_stick_warning", lambda to: to == "warned"),
    "hockey_stick": ("on_hockey_stick", lambda to: str(to).startswith("hockey_stick/")),
}
"""Detector (``DETECTORS`` key) -> (its ``metrics.*`` switch, which new state fires it)."""


def fire_step(event: Mapping) -> int:
    """The step a rollback must go back before: the event's step, or the onset step of its
    evidence (length collapse, reward decline) when that is earlier."""
    step = int(event["step"])
    onset = (event.get("evidence") or {}).get("onset_step")
    return min(step, int(onset)) if onset is not None else step


def rollback_target(checkpoint_steps: Iterable[int], before: int) -> int | None:
    """The step of the last checkpoint saved before step ``before`` (None when there is none)."""
    earlier = [int(s) for s in checkpoint_steps if int(s) < before]
    return max(earlier) if earlier else None


def due_actions(events: Iterable[Mapping], cfg, rollbacks: Iterable[Mapping] = (),
                checkpoint_steps: Iterable[int] = ()) -> list[dict]:
    """The actions the step's new detector events call for under ``cfg`` (a ``StabilityConfig``),
    in event order; ``log`` switches give none.

    A ``rollback`` gets ``fired_at`` and the ``restored_step`` it goes back to: the last of
    ``checkpoint_steps`` before ``fire_step``, and never before the last of the run's earlier
    ``rollbacks`` (their records, ``rollback_record``), so a rollback cannot undo another. One that
    cannot run (``cfg.rollback_max`` rollbacks made, or no such checkpoint) becomes
    ``cfg.rollback_fallback`` with the reason saying why (a ``log`` one is still recorded). After a
    ``kl`` or ``lr`` rollback to step R, one that fires on step R + 1 is only logged: that batch was
    sampled by the restored weights before the change acted on any update, so it repeats the
    evidence of that rollback and says nothing about the change (after a ``merge`` the merged
    weights sample step R + 1, so a firing there is new evidence and acts)."""
    rollbacks = list(rollbacks)
    floor = max((int(r["restored_step"]) for r in rollbacks), default=-1)
    # a merge changes the weights that sample step floor + 1; kl and lr act on updates only
    replayed = bool(rollbacks) and rollbacks[-1].get("change", {}).get("kind") in ("kl", "lr")
    steps = sorted(int(s) for s in checkpoint_steps if int(s) >= floor)
    out = []
    for ev in events:
        trig = TRIGGERS.get(ev.get("detector"))
        if trig is None or not trig[1](ev.get("to")):
            continue
        key, _ = trig
        action = getattr(cfg, key)
        if action == "log":
            continue
        reason = f"{ev['detector']} -> {ev['to']} at step {ev['step']} (metrics.{key} = {action})"
        act = {"step": int(ev["step"]), "action": action, "trigger": ev["detector"], "to": ev["to"],
               "reason": reason}
        if action == "rollback":
            before = fire_step(ev)
            target = rollback_target(steps, before)
            why = (f"metrics.rollback_max = {cfg.rollback_max} rollback(s) already made"
                   if len(rollbacks) >= cfg.rollback_max else
                   f"no checkpoint before step {before} to roll back to" if target is None else None)
            if replayed and int(ev["step"]) <= floor + 1:
                # the replayed step after a kl / lr rollback: its batch was sampled by the restored
                # weights before the change could act, so acting again would repeat the same
                # evidence (and compound the change, or fall back) without testing the change
                act.update(action="log", reason=f"{reason}: fired on step {ev['step']}, replayed from the "
                           f"rollback to step {floor} before its change could act; not acted on")
            elif why is not None:
                act.update(action=cfg.rollback_fallback,
                           reason=f"{reason}: {why}; metrics.rollback_fallback = {cfg.rollback_fallback}")
            else:
                act.update(fired_at=int(ev["step"]), restored_step=target)
        out.append(act)
    return out


def rollback_change(cfg, kl_coef: float, base: str | None = None) -> dict:
    """The change a rollback applies under ``cfg`` (``metrics.rollback_*``), as recorded:
    ``{"kind": "kl", "factor", "kl_coef": [old, new]}`` for the KL coefficient ``kl_coef`` of the
    restored state, ``{"kind": "lr", "factor"}``, or ``{"kind": "merge", "ratio", "base"}``."""
    kind = cfg.rollback_change
    if kind == "kl":
        return {"kind": "kl", "factor": cfg.rollback_kl_factor,
                "kl_coef": [kl_coef, kl_coef * cfg.rollback_kl_factor]}
    if kind == "lr":
        return {"kind": "lr", "factor": cfg.rollback_lr_factor}
    return {"kind": "merge", "ratio": cfg.rollback_merge_ratio, "base": base}


def lr_factor(rollbacks: Iterable[Mapping]) -> float:
    """The product of the ``lr`` factors of the run's rollbacks (1.0 with none): what the
    learning rates stand at relative to the config (a ``merge`` rebuild re-applies it)."""
    return math.prod(float(r["change"]["factor"]) for r in rollbacks if r["change"]["kind"] == "lr")


def describe(change: Mapping) -> str:
    """One readable phrase for a rollback's change (the record's reason, the report)."""
    if change["kind"] == "kl":
        old, new = change["kl_coef"]
        return f"KL coefficient x {change['factor']:g} ({old:g} -> {new:g})"
    if change["kind"] == "lr":
        return f"learning rates x {change['factor']:g}"
    return f"actor re-merged with {change['base']} at ratio {change['ratio']:g}"


def rollback_record(act: Mapping, change: Mapping, n: int, checkpoint: str) -> dict:
    """The ``stability_events.jsonl`` record of rollback number ``n`` (1-based) for the due
    action ``act`` (``due_actions``), once ``change`` was applied from ``checkpoint``."""
    r = int(act["restored_step"])
    return {"step": r, "action": "rollback", "trigger": act["trigger"], "to": act["to"],
            "fired_at": int(act["fired_at"]), "restored_step": r, "checkpoint": checkpoint,
            "change": dict(change), "rollback": int(n),
            "reason": f"{act['reason']}: rolled back to {checkpoint} (step {r}), {describe(change)}; "
                      f"rollback {n}"}


def pick_rollback(acts: Iterable[Mapping]) -> dict | None:
    """The rollback to run among a step's due actions: the first one, unless a ``stop`` is due
    (it wins); the other actions of that step belong to the abandoned steps and are not taken."""
    acts = list(acts)
    if any(a["action"] == "stop" for a in acts):
        return None
    return next((dict(a) for a in acts if a["action"] == "rollback"), None)


def take_actions(logger, cfg, save: Callable[[], object], acts: list[dict] | None = None) -> str | None:
    """Carry out the ``log`` / ``checkpoint`` / ``stop`` actions due after ``logger.log`` of a step
    (``acts``, default ``due_actions`` of the monitor's new events): record each, save a checkpoint
    for ``checkpoint`` and ``stop`` (once per step), and return the reason of a ``stop`` (else None).
    Rollbacks are the trainer's (``pick_rollback``); any left in ``acts`` are not recorded here."""
    if acts is None:
        monitor = getattr(logger, "monitor", None)
        acts = due_actions(monitor.new_events if monitor is not None else [], cfg)
    acts = [a for a in acts if a["action"] != "rollback"]
    if not acts:
        return None
    logger.log_events(acts)
    if not any(a["action"] in ("checkpoint", "stop") for a in acts):
        return None
    ckpt = save()
    stops = [a for a in acts if a["action"] == "stop"]
    return f"stopped on purpose: {stops[0]['reason']}; checkpoint {ckpt}" if stops else None
