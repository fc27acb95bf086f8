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


def kill_worker(root: int, cls: str, exclude=()) -> int:
    """SIGKILL one worker of class ``cls`` below ``root`` (not one of ``exclude``, e.g. a dying one
    of an earlier generation); returns its pid (raises if none runs)."""
    pids = [p for p in worker_pids(root, cls) if p not in set(exclude)]
    if not pids:
        raise LookupError(f"no ray::{cls} process below pid {root}")
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]


def listening_sockets(pids) -> list[tuple[str, int, str]]:
    """(local IP address, port, process names) of each listening TCP socket (IPv4 and IPv6) that
    processes ``pids`` hold; IPv4-mapped IPv6 addresses are shown as IPv4. A socket inherited by
    forked children is held by several processes: its names are all of theirs, sorted and joined
    by " | " (so a filter on the process that opened it sees that name)."""
    import ipaddress

    owners = {}
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    owners.setdefault(link[8:-1], set()).add(name)
        except OSError:
            continue
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] != "0A" or f[9] not in owners:  # 0A: LISTEN
                continue
            hexaddr, hexport = f[1].split(":")
            raw = bytes.fromhex(hexaddr)
            if v6:  # four little-endian 32-bit words
                ip = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
                addr = str(ip.ipv4_mapped or ip)
            else:
                addr = str(ipaddress.IPv4Address(raw[::-1]))
            out.append((addr, int(hexport, 16), " | ".join(sorted(owners[f[9]]))))
    return out
