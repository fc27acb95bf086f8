"""Test-only fault injection for `rlhf train` (kept out of ``src/``).

``tests/conftest.py`` puts this directory on ``sys.path`` and ``PYTHONPATH``, so the Ray workers
(which inherit the environment) import it like an installed module:
``reward.function=rlhf_faults:crash_once``. The process helpers find the Ray worker processes
of one role among the *descendants of a given process* (the test's own Ray cluster), so a test
never touches another session's processes.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

from rlhf.rewards import digit_ratio

CRASH_MARKER = os.path.join(tempfile.gettempdir(), f"rlhf_crash_once.{os.getuid()}.marker")
"""When this file exists and holds N, the reward worker's N-th ``crash_once`` call kills it."""

_CALLS = {"n": 0, "nan": 0}


def crash_once(prompts: list[str], responses: list[str], finished: list[bool]) -> list[float]:
    """``digit_ratio``; when ``CRASH_MARKER`` holds N, the N-th call in this process deletes the
    file and kills the process (a worker death the trainer must restart from)."""
    _CALLS["n"] += 1
    try:
        n = int(Path(CRASH_MARKER).read_text().strip() or 1)
    except (FileNotFoundError, ValueError):
        n = None
    if n is not None and _CALLS["n"] >= n:
        os.remove(CRASH_MARKER)
        os._exit(1)
    return digit_ratio(prompts, responses, finished)


def nan_reward(prompts: list[str], responses: list[str], finished: list[bool]) -> list[float]:
    """``digit_ratio`` for two calls, then NaN scores (the trainer must stop, keeping its checkpoint)."""
    _CALLS["nan"] += 1
    if _CALLS["nan"] > 2:
        return [float("nan")] * len(responses)
    return digit_ratio(prompts, responses, finished)


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(d))
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def worker_pids(root: int, cls: str) -> list[int]:
    """Ray worker processes of actor class ``cls`` (e.g. ``ActorWorker``) below ``root`` (Ray names
    an actor's process ``ray::CLASS`` / ``ray::CLASS.method``)."""
    out = []
    for p in descendants(root):
        try:
            title = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title == f"ray::{cls}" or title.startswith(f"ray::{cls}."):
            out.append(p)
    return out


def kill_worker(root: int, cls: str) -> int:
    """SIGKILL one worker of class ``cls`` below ``root``; returns its pid (raises if none runs)."""
    pids = worker_pids(root, cls)
    if not pids:
        raise LookupError(f"no ray::{cls} process below pid {root}")
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]
