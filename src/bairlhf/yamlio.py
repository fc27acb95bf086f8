"""YAML read with errors that name the file and the line (``UserError``), never a traceback.

``load_mapping(path)`` reads a YAML file that must hold a mapping (an empty file gives ``{}``);
``parse_value(raw, key)`` parses one command-line override value.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from bairlhf.errors import UserError


def _where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def _problem(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if "'\\t'" in problem or "\t" in problem:
        problem += " (YAML forbids tabs for indentation; use spaces)"
    return problem


def load_yaml(path: str | Path, what: str = "config"):
    """Parse a YAML file; raises ``UserError`` naming ``path`` (and line:column on a syntax error)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what}: file does not exist: {p}")
    if not p.is_file():
        raise UserError(f"{what}: not a file: {p}")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what}: cannot read {p}: {e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{p}{_where(e)}: YAML syntax error: {_problem(e)}") from None


def load_mapping(path: str | Path, what: str = "config") -> dict:
    """``load_yaml`` that must give a mapping (an empty file is ``{}``)."""
    data = load_yaml(path, what)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what} must be a mapping of keys, got {type(data).__name__}")
    return data


def parse_value(raw: str, key: str):
    """One ``key=value`` override value, parsed as YAML (``""`` is ``None``)."""
    if raw == "":
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise UserError(f"{key}: cannot parse override value {raw!r}: {_problem(e)}") from None
