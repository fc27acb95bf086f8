"""Table-driven bad-input cases: each runs one CLI command in process and asserts the error
boundary's promise (issue 12): exit code 2, one line on stderr naming the culprit, no
traceback, and no file created, changed or deleted under the watched directory.

A case is ``Case(id, argv, expect, setup=None)``: ``argv[0]`` is ``bai`` or ``rlhf``; ``setup``
(optional) is called with the case's working directory before the snapshot is taken and may
write input files there (argv may use ``{d}`` for that directory); ``expect`` is a substring the
message must contain (the key, file or tensor).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass
class Case:
    id: str
    argv: list[str]
    expect: str
    setup: Callable[[Path], None] | None = None


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> content hash (or ``dir``/``link``) of everything under ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_case(case: Case, workdir: Path, capsys, monkeypatch) -> str:
    """Run ``case`` with ``workdir`` as the current directory; return the error line."""
    from bai.cli import main as bai_main
    from rlhf.cli import main as rlhf_main

    workdir.mkdir(parents=True, exist_ok=True)
    if case.setup is not None:
        case.setup(workdir)
    monkeypatch.chdir(workdir)
    before = snapshot(workdir)
    argv = [a.replace("{d}", str(workdir)) for a in case.argv]
    main = {"bai": bai_main, "rlhf": rlhf_main}[argv[0]]
    capsys.readouterr()
    rc = main(argv[1:])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2, f"{case.id}: exit code {rc}, stderr:\n{err}\nstdout:\n{out}"
    assert "Traceback" not in err, f"{case.id}: traceback:\n{err}"
    assert len(lines) == 1, f"{case.id}: expected one error line, got:\n{err}"
    assert case.expect in lines[0], f"{case.id}: {case.expect!r} not named in {lines[0]!r}"
    after = snapshot(workdir)
    assert after == before, f"{case.id}: files changed: " + str(sorted(set(after.items()) ^ set(before.items()))[:10])
    return lines[0]
