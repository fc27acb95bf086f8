"""One logger per run: ``metrics.jsonl`` (one JSON object per step) and TensorBoard event files.

    run_dir/metrics.jsonl            {"step": k, "<name>": value, ...} per line, flushed per step
    run_dir/stability_events.jsonl   detector verdict changes {"step", "detector", "from", "to", "evidence"}
    run_dir/tensorboard/             TensorBoard scalars (and verdict changes as text)

Non-finite values are written as JSON ``null`` (strict JSON readers accept the file) and skipped
in TensorBoard. With ``resume_step=k`` the records with step > k are dropped from both JSONL
files (rewritten through a temporary sibling and renamed) and TensorBoard purges its events
after k, so a resumed run's files equal an uninterrupted run's. Without ``resume_step`` the run
starts afresh: existing JSONL files are renamed to ``*.bak`` (never deleted) and TensorBoard
hides the old event files' steps.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from rlhf.metrics.detectors import StabilityMonitor

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "stability_events.jsonl"
TB_DIR = "tensorboard"


def _clean(value: Any) -> float | None:
    v = float(value.item() if hasattr(value, "item") else value)
    return v if math.isfinite(v) else None


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSONL file; a partially written last line (a live run) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with path.open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def truncate_jsonl(path: Path, resume_step: int) -> list[dict]:
    """Keep records with step <= resume_step (any appended run file: metrics, stability events,
    probes); rewrite via a temporary sibling + rename."""
    kept = [r for r in read_jsonl(path) if int(r.get("step", -1)) <= resume_step]
    if path.exists():
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)
    return kept


class MetricLogger:
    """Write per-step metrics to JSONL and TensorBoard; optionally run a ``StabilityMonitor``.

    ``log(step, metrics)`` writes one record. With ``monitor`` the detectors run first: their
    ``stability/*`` metrics join the record and verdict changes go to ``stability_events.jsonl``
    and TensorBoard text. On resume, a monitor without history is rebuilt by replaying the kept
    records (the detectors are deterministic, so it ends in the uninterrupted run's state).
    """

    def __init__(self, run_dir: str | Path, resume_step: int | None = None,
                 monitor: StabilityMonitor | None = None, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.monitor = monitor
        self.metrics_path = self.run_dir / METRICS_FILE
        self.events_path = self.run_dir / EVENTS_FILE
        if resume_step is not None:
            kept = truncate_jsonl(self.metrics_path, resume_step)
            truncate_jsonl(self.events_path, resume_step)
            if monitor is not None and not monitor.history:
                for r in kept:
                    inputs = {k: v for k, v in r.items()
                              if k != "step" and v is not None and not k.startswith("stability/")}
                    monitor.update(int(r["step"]), inputs)
                monitor.new_events = []
        else:  # a fresh start (or a restart before the first checkpoint): keep any old files as *.bak
            for path in (self.metrics_path, self.events_path):
                if path.exists():
                    os.replace(path, path.with_name(path.name + ".bak"))
        self._file = self.metrics_path.open("a")
        self._events = None
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard is slow to import

            purge = 0 if resume_step is None else resume_step + 1   # hide older event files' later steps
            self._writer = SummaryWriter(log_dir=str(self.run_dir / TB_DIR), purge_step=purge)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float | None]:
        """Write one step; returns the record written (including detector metrics)."""
        record: dict[str, Any] = {"step": int(step)}
        for k, v in metrics.items():
            if k == "step":
                continue
            record[k] = _clean(v)
        events: list[dict] = []
        if self.monitor is not None:
            for k, v in self.monitor.update(step, {k: v for k, v in record.items() if v is not None}).items():
                record[k] = _clean(v)
            events = self.monitor.new_events
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if events:
            self.log_events(events)
        if self._writer is not None:
            for k, v in record.items():
                if k != "step" and v is not None:
                    self._writer.add_scalar(k, v, global_step=int(step))
            self._writer.flush()
        return record

    def log_events(self, events: list[dict]) -> None:
        """Append detector verdict changes (also as TensorBoard text under ``stability/events``)."""
        if self._events is None:
            self._events = self.events_path.open("a")
        for ev in events:
            self._events.write(json.dumps(ev, default=_clean) + "\n")
            if self._writer is not None:
                self._writer.add_text("stability/events", f"{ev['detector']}: {ev['from']} -> {ev['to']}",
                                      global_step=int(ev["step"]))
        self._events.flush()

    def close(self) -> None:
        self._file.close()
        if self._events is not None:
            self._events.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
