"""Output directories a command owns, and atomic writes.

A command that creates an output directory writes a marker file (``MARKER``, JSON naming the
command) into it. ``--force`` replaces an existing directory only when its marker names the same
command, and never a directory that is, contains or lies inside one of the command's inputs, so
no command deletes or overwrites anything it did not create. ``check_output`` runs before any
work; ``replace_dir`` swaps a finished temporary sibling into place (the old directory is
removed only after the new one is in place).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from bairlhf.errors import UserError

MARKER = ".bai-rlhf-output.json"
"""File inside every output directory a command created: ``{"command": "bai merge"}``."""


def owner(path: str | Path) -> str | None:
    """The command that created directory ``path`` (its marker), or ``None``."""
    try:
        data = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data.get("command") if isinstance(data, dict) else None


def mark_output(path: str | Path, command: str, **extra) -> None:
    """Record that ``command`` created directory ``path``."""
    atomic_write(Path(path) / MARKER, json.dumps({"command": command, **extra}) + "\n")


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output(out: str | Path, command: str, inputs=(), force: bool = False,
                 flag: str = "--force", legacy=None) -> Path:
    """Refuse, before any work, an output ``out`` that this command may not (re)place.

    ``inputs``: paths the command reads (files or directories); ``out`` must not be, contain or
    lie inside any of them. An existing ``out`` needs ``force`` and must carry ``command``'s
    marker. ``legacy`` (optional, ``Path -> bool``) accepts an unmarked directory as ``command``'s
    own: outputs it wrote before marker files existed. Returns ``out`` resolved.
    """
    out_r = Path(out).expanduser().resolve()
    for inp in inputs:
        if inp is None:
            continue
        inp_r = Path(inp).expanduser().resolve()
        if _overlap(out_r, inp_r):
            rel = "is" if out_r == inp_r else ("lies inside" if inp_r in out_r.parents else "contains")
            raise UserError(f"{out}: the output directory {rel} the input {inp}; choose another output directory")
    if out_r.exists() or Path(out).is_symlink():
        if not force:
            raise UserError(f"{out}: already exists; pass {flag} to replace it")
        if not out_r.is_dir():
            raise UserError(f"{out}: exists and is not a directory; refusing to replace it")
        made_by = owner(out_r)
        if made_by is None and legacy is not None and legacy(out_r):
            made_by = command
        if made_by != command:
            who = f"was written by `{made_by}`" if made_by else f"was not written by `{command}` (no {MARKER})"
            raise UserError(f"{out}: {who}; {flag} replaces only an earlier output of `{command}`, "
                            f"so choose another directory (nothing was changed)")
    return out_r


def replace_dir(tmp: str | Path, out: str | Path) -> None:
    """Move the finished directory ``tmp`` to ``out``; an existing ``out`` (checked by
    ``check_output``) is moved aside first and deleted only once ``tmp`` is in place."""
    tmp, out = Path(tmp), Path(out)
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    else:
        os.replace(tmp, out)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs on this machine (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_leftovers(out: str | Path, kinds: tuple[str, ...]) -> list[tuple[str, Path]]:
    """``(kind, path)`` of the sibling directories ``.NAME.KIND-PID`` of ``out`` whose process PID
    is dead: the temporaries a killed earlier run left (``kinds`` such as ``"tmp-bai"``, or
    ``"old"``, the old directory ``replace_dir`` moves aside). Sorted by path; removes nothing."""
    out = Path(out)
    pat = re.compile(rf"^\.{re.escape(out.name)}\.({'|'.join(map(re.escape, kinds))})-(\d+)$")
    found = []
    for sib in sorted(out.parent.iterdir()) if out.parent.is_dir() else []:
        m = pat.match(sib.name)
        if m and sib.is_dir() and not pid_alive(int(m.group(2))):
            found.append((m.group(1), sib))
    return found


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and ``os.replace``: a reader (or a
    kill) sees the old file or the new one, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
