"""Rule-based rewards, loaded by name as ``module:function``.

A reward function takes the decoded prompts and responses (and whether each response ended
with EOS) and returns one float per response: ``fn(prompts, responses, finished) -> list[float]``.
It runs inside the reward worker, so it must be importable there (an installed module).
"""

from __future__ import annotations

import importlib
import os
import tempfile
from typing import Callable

CRASH_MARKER = os.path.join(tempfile.gettempdir(), "rlhf_crash_once.marker")
RewardFn = Callable[[list[str], list[str], list[bool]], list[float]]


def load_reward_function(spec: str) -> RewardFn:
    """Import ``module:function``; raises naming ``reward.function`` when it cannot."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward.function: cannot load {spec!r}: {e}") from e
    if not callable(fn):
        raise ValueError(f"reward.function: {spec!r} is not callable")
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


_CALLS = {"n": 0}


def crash_once(prompts: list[str], responses: list[str], finished: list[bool]) -> list[float]:
    """Fault injection for restart tests, otherwise ``digit_ratio``: when the file ``CRASH_MARKER``
    exists and holds N, the N-th call in this process deletes the file and kills the process."""
    _CALLS["n"] += 1
    try:
        with open(CRASH_MARKER) as f:
            n = int(f.read().strip() or 1)
    except (FileNotFoundError, ValueError):
        n = None
    if n is not None and _CALLS["n"] >= n:
        os.remove(CRASH_MARKER)
        os._exit(1)
    return digit_ratio(prompts, responses, finished)


def nan_reward(prompts: list[str], responses: list[str], finished: list[bool]) -> list[float]:
    """Fault injection: ``digit_ratio`` for two calls, then NaN scores (the trainer must stop with a
    clear error and keep its last checkpoint)."""
    _CALLS["nan"] = _CALLS.get("nan", 0) + 1
    if _CALLS["nan"] > 2:
        return [float("nan")] * len(responses)
    return digit_ratio(prompts, responses, finished)
