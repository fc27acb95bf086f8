"""Actions on a detector's verdict: one config switch per detector (``metrics.on_*``).

    metrics.on_collapse_warning       the collapse warning is raised     (detector collapse_warning -> warned)
    metrics.on_collapse               a length collapse is detected      (length_collapse -> collapsed)
    metrics.on_hockey_stick_warning   the reward-decline warning         (hockey_stick_warning -> warned)
    metrics.on_hockey_stick           a decline is classed hockey stick  (hockey_stick -> hockey_stick/*)

Each is ``log`` (default: the event is recorded, nothing else), ``checkpoint`` (a checkpoint is
saved at that step, so the state at the warning can be studied or resumed with other settings)
or ``stop`` (a checkpoint is saved and the run ends cleanly: exit code 1 and the reason on
stderr; ``rlhf train --resume RUN_DIR`` continues it, the detector does not fire again). Every
action taken is appended to ``stability_events.jsonl`` as ``{"step", "action", "trigger",
"to", "reason"}`` and reaches TensorBoard text; the file is cut back with the run on resume.

Pure: imports no torch, Ray or engines; the trainer passes a ``save`` callback.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

TRIGGERS: dict[str, tuple[str, Callable[[str], bool]]] = {
    "collapse_warning": ("on_collapse_warning", lambda to: to == "warned"),
    "length_collapse": ("on_collapse", lambda to: to == "collapsed"),
    "hockey_stick_warning": ("on_hockey_stick_warning", lambda to: to == "warned"),
    "hockey_stick": ("on_hockey_stick", lambda to: str(to).startswith("hockey_stick/")),
}
"""Detector (``DETECTORS`` key) -> (its ``metrics.*`` switch, which new state fires it)."""


def due_actions(events: Iterable[Mapping], cfg) -> list[dict]:
    """The actions the step's new detector events call for under ``cfg`` (a ``StabilityConfig``),
    in event order; ``log`` switches give none."""
    out = []
    for ev in events:
        trig = TRIGGERS.get(ev.get("detector"))
        if trig is None or not trig[1](ev.get("to")):
            continue
        key, _ = trig
        action = getattr(cfg, key)
        if action == "log":
            continue
        out.append({"step": int(ev["step"]), "action": action, "trigger": ev["detector"], "to": ev["to"],
                    "reason": f"{ev['detector']} -> {ev['to']} at step {ev['step']} (metrics.{key} = {action})"})
    return out


def take_actions(logger, cfg, save: Callable[[], object]) -> str | None:
    """Carry out the actions due after ``logger.log`` of a step: record each, save a checkpoint for
    ``checkpoint`` and ``stop`` (once per step), and return the reason of a ``stop`` (else None)."""
    monitor = getattr(logger, "monitor", None)
    acts = due_actions(monitor.new_events if monitor is not None else [], cfg)
    if not acts:
        return None
    logger.log_events(acts)
    ckpt = save()
    stops = [a for a in acts if a["action"] == "stop"]
    return f"stopped on purpose: {stops[0]['reason']}; checkpoint {ckpt}" if stops else None
