"""Rule-based rewards, loaded by name as ``module:function``.

A reward function takes the decoded prompts and responses (and whether each response ended
with EOS) and returns one float per response: ``fn(prompts, responses, finished) -> list[float]``.
It runs inside the reward worker, so it must be importable there: an installed module (or on
``PYTHONPATH``); the current and run directories count only with ``reward.allow_local_code``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Callable

RewardFn = Callable[[list[str], list[str], list[bool]], list[float]]


class RewardImportError(ValueError):
    """``reward.function`` / ``reward.metrics`` cannot be loaded; the message names the key."""


def _local(entry: str | Path, cwds: list[Path], dirs: list[Path]) -> bool:
    """Whether a path is one of the working directories ``cwds`` or lies in one of ``dirs``."""
    try:
        p = Path(entry or ".").resolve()
    except OSError:
        return False
    return p in cwds or any(p == d or d in p.parents for d in dirs)


def import_installed(module: str, key: str, local_dirs=(), allow_local: bool = False, cwds=()):
    """Import ``module`` from installed locations only: ``sys.path`` minus the current directory
    (and the other working directories ``cwds``, e.g. the driver's in a Ray worker) and minus
    anything inside ``local_dirs`` (the run directory), unless ``allow_local``. A module already
    imported from such a place is refused too. Raises ``RewardImportError`` naming ``key``."""
    if allow_local:
        return importlib.import_module(module)
    cwds = [Path.cwd().resolve(), *(Path(c).resolve() for c in cwds)]
    dirs = [Path(d).resolve() for d in local_dirs]
    saved = list(sys.path)
    sys.path[:] = [e for e in saved if not _local(e, cwds, dirs)]
    try:
        mod = importlib.import_module(module)
    finally:
        sys.path[:] = saved
    origin = getattr(sys.modules.get(module.split(".")[0]), "__file__", None)
    if origin:
        root = Path(origin).resolve().parent
        root = root.parent if root.joinpath("__init__.py") == Path(origin).resolve() else root
        if _local(root, cwds, dirs):
            raise RewardImportError(f"{key}: {module} was imported from {root}, the current or run directory; "
                                    "install it, put it on PYTHONPATH, or set reward.allow_local_code: true")
    return mod


def load_reward_function(spec: str, key: str = "reward.function", local_dirs=(),
                         allow_local: bool = False, cwds=()) -> RewardFn:
    """Import ``module:function`` (installed modules only, see ``import_installed``); raises
    ``RewardImportError`` naming ``key`` when it cannot."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(import_installed(module, key, local_dirs, allow_local, cwds), name)
    except RewardImportError:
        raise
    except Exception as e:  # ImportError, AttributeError, or whatever the module raised at import
        hint = "" if allow_local else " (only installed modules or PYTHONPATH; reward.allow_local_code: true lifts that)"
        raise RewardImportError(f"{key}: cannot load {spec!r}: {type(e).__name__}: {e}{hint}") from None
    if not callable(fn):
        raise RewardImportError(f"{key}: {spec!r} is not callable")
    return fn


def digit_ratio(prompts: list[str], responses: list[str], finished: list[bool]) -> list[float]:
    """Fraction of non-space response characters that are digits (0 for an empty response).

    A dense, easily learned signal for the tiny CPU default: a random policy starts near 0.05
    and PPO pushes probability onto digit tokens within a few dozen steps.
    """
    out = []
    for r in responses:
        chars = [c for c in r if not c.isspace()]
        out.append(sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0)
    return out


def short_answer(prompts: list[str], responses: list[str], finished: list[bool]) -> list[float]:
    """1 for a response that ends with EOS, minus 0.01 per character: rewards stopping early."""
    return [(1.0 if f else 0.0) - 0.01 * len(r) for r, f in zip(responses, finished)]
