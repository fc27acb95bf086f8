"""One logger per run: JSONL (always), TensorBoard and Weights & Biases, selected by config.

    run_dir/metrics.jsonl            {"step": k, "<name>": value, ...} per line, flushed per step
    run_dir/stability_events.jsonl   detector verdict changes {"step", "detector", "from", "to", "evidence"}
                                     and actions taken {"step", "action", "trigger", "to", "reason"}
    run_dir/tensorboard/             ``tensorboard``: scalars, verdict changes as text, and the
                                     per-step response-length histogram ``rollout/length_hist``
    run_dir/wandb/                   ``wandb``: a W&B run (offline unless ``WANDB_MODE`` says
                                     otherwise) with the same scalars and ``rollout/length_hist``

``MetricLogger(run_dir, loggers=["jsonl", "tensorboard", "wandb"])`` is the one interface the
trainer writes through (``trainer.loggers`` in the run config). ``metrics.jsonl`` is the run's
record (resume, the detectors and ``rlhf report`` read it), so ``jsonl`` is always written.

The length histogram is built from the length-bucket counts already in each record
(``reward/bucket_XX_count``, ``metrics.bucket_width`` tokens wide; the last bucket ends at
``rollout/length_max``), with the record's exact min / max / mean / std of the lengths, so it
needs no extra run file and ``rlhf report``'s length heatmap reads the same counts.

W&B: the run lives in ``run_dir/wandb`` (``WANDB_MODE`` unset means ``offline``: no network, no
login; upload later with ``wandb sync run_dir/wandb/offline-run-*``). Its id is kept in
``run_dir/wandb/rlhf_run_id``; a resumed run continues that id (``resume="allow"``), a fresh
start gets a new one. The project is ``WANDB_PROJECT`` (default ``rlhf``), the name the run
directory's, the config the run's ``config.yaml``.

Non-finite values are written as JSON ``null`` (strict JSON readers accept the file) and skipped
in TensorBoard and W&B. With ``resume_step=k`` the records with step > k are dropped from both
JSONL files (rewritten through a temporary sibling and renamed) and TensorBoard purges its events
after k, so a resumed run's files equal an uninterrupted run's. Without ``resume_step`` the run
starts afresh: existing JSONL files are renamed to ``*.bak`` (never deleted) and TensorBoard
hides the old event files' steps.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

from rlhf.metrics.batch import bucket_key
from rlhf.metrics.config import StabilityConfig
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


LOGGERS = ("jsonl", "tensorboard", "wandb")
"""The logger names ``trainer.loggers`` may list."""
HIST_TAG = "rollout/length_hist"
WANDB_DIR = "wandb"
WANDB_ID_FILE = "rlhf_run_id"


def length_histogram(record: Mapping[str, Any], bucket_width: int, num_buckets: int):
    """Response-length histogram of one record from its bucket counts: ``(counts, edges)`` with
    ``len(edges) == len(counts) + 1`` (bucket i is ``[edges[i], edges[i+1])``, trailing empty
    buckets dropped, the open-ended last bucket closed at ``rollout/length_max + 1``), or None
    when the record has no bucket counts."""
    counts = [record.get(bucket_key(i, "count")) for i in range(num_buckets)]
    if all(c is None for c in counts):
        return None
    counts = [float(c or 0.0) for c in counts]
    while counts and counts[-1] == 0:
        counts.pop()
    if not counts:
        return None
    edges = [float(i * bucket_width) for i in range(len(counts) + 1)]
    if len(counts) == num_buckets:       # the last bucket is open-ended
        top = record.get("rollout/length_max")
        edges[-1] = max(edges[-2] + bucket_width, float(top) + 1.0 if top is not None else edges[-1])
    return counts, edges


class _TensorBoard:
    def __init__(self, run_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard is slow to import

        purge = 0 if resume_step is None else resume_step + 1   # hide older event files' later steps
        self.writer = SummaryWriter(log_dir=str(run_dir / TB_DIR), purge_step=purge)

    def log(self, step: int, scalars: dict[str, float], hist) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, global_step=step)
        if hist is not None:
            counts, edges, rec = hist
            n = sum(counts)
            mean, std = rec.get("rollout/length_mean"), rec.get("rollout/length_std")
            lo, hi = rec.get("rollout/length_min"), rec.get("rollout/length_max")
            mean = mean if mean is not None else sum(c * (a + b) / 2 for c, a, b in zip(counts, edges, edges[1:])) / n
            std = std if std is not None else 0.0
            self.writer.add_histogram_raw(HIST_TAG, min=lo if lo is not None else edges[0],
                                          max=hi if hi is not None else edges[-1], num=n, sum=mean * n,
                                          sum_squares=(std * std + mean * mean) * n,
                                          bucket_limits=edges[1:], bucket_counts=counts, global_step=step)
        self.writer.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, global_step=step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, run_dir: Path, resume_step: int | None):
        import wandb  # optional dependency: `pip install wandb` (checked by the config)

        root = run_dir / WANDB_DIR
        root.mkdir(parents=True, exist_ok=True)
        id_file = root / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume_step is not None and id_file.exists() else None
        if run_id is None:
            run_id = uuid.uuid4().hex[:12]   # W&B ids: lower-case letters and digits
            id_file.write_text(run_id + "\n")
        config = None
        if (run_dir / "config.yaml").exists():
            import yaml

            try:
                config = yaml.safe_load((run_dir / "config.yaml").read_text())
            except yaml.YAMLError:
                config = None     # the run's config is checked elsewhere; W&B just goes without it
        want = {"silent": True, "console": "off", "disable_git": True, "save_code": False,
                "x_disable_stats": True, "x_disable_machine_info": True}
        fields = getattr(wandb.Settings, "model_fields", None)
        kw = {k: v for k, v in want.items() if k in fields} if fields else {"silent": True, "console": "off"}
        settings = wandb.Settings(**kw)
        self.wandb = wandb
        self.run = wandb.init(dir=str(run_dir), mode=os.environ.get("WANDB_MODE") or "offline",
                              project=os.environ.get("WANDB_PROJECT") or "rlhf", name=run_dir.name,
                              id=run_id, resume="allow", config=config if isinstance(config, dict) else None,
                              settings=settings)

    def log(self, step: int, scalars: dict[str, float], hist) -> None:
        data: dict[str, Any] = dict(scalars)
        if hist is not None:
            counts, edges, _ = hist
            data[HIST_TAG] = self.wandb.Histogram(np_histogram=(counts, edges))
        self.run.log(data, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        pass    # verdict changes reach W&B as the stability/* scalars; the text stays in JSONL and TensorBoard

    def close(self) -> None:
        self.run.finish()


class MetricLogger:
    """Write per-step metrics to JSONL, TensorBoard and W&B; optionally run a ``StabilityMonitor``.

    ``loggers``: which of ``LOGGERS`` to write (``jsonl`` always; default ``["jsonl",
    "tensorboard"]``, or ``["jsonl"]`` with ``tensorboard=False``). ``buckets``: the length
    buckets of the per-step histogram (default: the monitor's config, else 100-token buckets).
    ``log(step, metrics)`` writes one record. With ``monitor`` the detectors run first: their
    ``stability/*`` metrics join the record and verdict changes go to ``stability_events.jsonl``
    and TensorBoard text. On resume, a monitor without history is rebuilt by replaying the kept
    records (the detectors are deterministic, so it ends in the uninterrupted run's state).
    """

    def __init__(self, run_dir: str | Path, resume_step: int | None = None,
                 monitor: StabilityMonitor | None = None, tensorboard: bool = True,
                 loggers: Sequence[str] | None = None, buckets: StabilityConfig | None = None):
        if loggers is None:
            loggers = ["jsonl", "tensorboard"] if tensorboard else ["jsonl"]
        bad = [x for x in loggers if x not in LOGGERS]
        if bad:
            raise ValueError(f"unknown logger(s) {bad}; choose from {', '.join(LOGGERS)}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.monitor = monitor
        self.buckets = buckets or (monitor.config if monitor is not None else StabilityConfig())
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
        self._sinks: list = []
        try:
            if "tensorboard" in loggers:
                self._sinks.append(_TensorBoard(self.run_dir, resume_step))
            if "wandb" in loggers:
                self._sinks.append(_Wandb(self.run_dir, resume_step))
        except BaseException:
            self.close()
            raise

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
        if self._sinks:
            scalars = {k: v for k, v in record.items() if k != "step" and v is not None}
            h = length_histogram(record, self.buckets.bucket_width, self.buckets.num_buckets)
            for sink in self._sinks:
                sink.log(int(step), scalars, None if h is None else (*h, record))
        return record

    def log_events(self, events: list[dict]) -> None:
        """Append detector verdict changes (also as TensorBoard text under ``stability/events``)."""
        if self._events is None:
            self._events = self.events_path.open("a")
        for ev in events:
            self._events.write(json.dumps(ev, default=_clean) + "\n")
            for sink in self._sinks:
                line = (f"action {ev['action']}: {ev['reason']}" if "action" in ev
                        else f"{ev['detector']}: {ev['from']} -> {ev['to']}")
                sink.text(int(ev["step"]), "stability/events", line)
        self._events.flush()

    def close(self) -> None:
        self._file.close()
        if self._events is not None:
            self._events.close()
        for sink in self._sinks:
            sink.close()
        self._sinks = []

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
