"""The one reader of JSONL input files (prompts, SFT records, preference pairs, calibration data).

``read_jsonl`` reads the whole file and checks every line before any work: each non-blank line must
be a JSON object; optional per-record checks (required fields, string / non-empty fields, a
caller's own check) name ``path:line``. Errors are ``UserError`` or the caller's subclass of it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import UserError


def read_jsonl(path: str | Path, what: str = "records", *,
               required_fields: Sequence[str] = (),
               strings: bool = False,
               nonempty: bool = False,
               set_by: str | None = None,
               check: Callable[[dict, str], None] | None = None,
               path_key: str | None = None,
               allow_empty: bool = False,
               error: type[UserError] = UserError) -> list[dict]:
    """Read the JSON objects of a JSONL file (blank lines skipped), every line checked.

    ``what``: the plural noun for the records in the "no records" error (``"records"``, ``"pairs"``).
    ``required_fields``: keys every record must hold; with ``strings`` their values must be
    strings, with ``nonempty`` also not blank. ``set_by``: the config key naming those fields,
    quoted in the missing-field error. ``check(record, "path:line")``: a further per-record check
    that raises. ``path_key``: the config key naming the file; read errors (missing file, not UTF-8)
    then start with ``"<path_key>: cannot read"``. ``allow_empty``: accept a file with no records
    (otherwise an error). Raises ``error`` (a ``UserError`` subclass) naming ``path:line``.
    """
    p = Path(path)
    cannot = f"{path_key}: cannot read {p}" if path_key else f"{p}: cannot read"
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise error(f"{cannot}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        where = f"{path_key}: cannot read {p}:{line}" if path_key else f"{p}:{line}"
        raise error(f"{where}: not UTF-8 text") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(rec, dict):
            raise error(f"{where}: expected a JSON object, got a JSON {type(rec).__name__}")
        for f in required_fields:
            if f not in rec:
                by = f"set by {set_by}; " if set_by else ""
                raise error(f"{where}: record has no field {f!r} ({by}record keys: {sorted(rec)[:8]})")
            if (strings or nonempty) and not isinstance(rec[f], str):
                raise error(f"{where}: field {f!r} must be a string, got {type(rec[f]).__name__}")
            if nonempty and not rec[f].strip():
                raise error(f"{where}: field {f!r} is empty")
        if check is not None:
            check(rec, where)
        records.append(rec)
    if not records and not allow_empty:
        raise error(f"{p}: no {what}")
    return records
