"""Prompts: JSONL / parquet files (or a built-in arithmetic set), chat template, ``<think>`` prefill.

``check_prompts(cfg.data)`` validates the prompts file before any work (``rlhf.config
.load_config`` calls it): it parses, every record has the prompt field, holds a string or a
list of chat messages, and there is at least one; errors are ``ConfigError`` naming the file
and line (JSONL) or row (parquet). ``load_prompts`` reads the raw prompts with the same
checks; ``encode_prompts`` renders and tokenizes them once; ``PromptSampler`` walks a seeded
permutation epoch by epoch and its ``state_dict`` (epoch, position) is all an exact resume needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bairlhf.jsonl import read_jsonl
from rlhf.config import ConfigError

THINK_PREFILL = "<think>\n"


def builtin_arith(n: int, seed: int = 1234) -> list[str]:
    """``n`` deterministic arithmetic questions (the demo's prompt set)."""
    rng = np.random.default_rng(seed)
    return [f"Question: what is {a} plus {b}?" for a, b in rng.integers(0, 50, size=(n, 2)).tolist()]


BUILTINS = {"builtin:arith": builtin_arith}
"""Built-in prompt sets (``data.path`` value -> ``f(n) -> prompts``)."""


def check_builtin(path: str) -> None:
    """A ``builtin:`` ``data.path`` must name a known set (``ConfigError`` naming ``data.path``)."""
    if path.startswith("builtin:") and path not in BUILTINS:
        raise ConfigError(f"data.path: unknown built-in prompt set {path!r} (known: {', '.join(BUILTINS)})")


def _check_prompt(value, where: str, key: str) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise ConfigError(f"{where}: field {key!r} is an empty string")
        return
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        return
    raise ConfigError(f"{where}: field {key!r} must be a string or a non-empty list of "
                      f"{{\"role\", \"content\"}} messages, got {type(value).__name__}")


def _read_jsonl(p: Path, key: str) -> list:
    def check(rec: dict, where: str) -> None:
        if key not in rec:
            raise ConfigError(f"{where}: record has no {key!r} field (data.prompt_key; record keys: "
                              f"{sorted(rec)[:8]})")
        _check_prompt(rec[key], where, key)

    return [rec[key] for rec in read_jsonl(p, "prompts", check=check, path_key="data.path", allow_empty=True,
                                           error=ConfigError)]

def _read_parquet(p: Path, key: str) -> list:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(p)
        if key not in schema.names:
            raise ConfigError(f"data.prompt_key: column {key!r} not in {p} (columns: {schema.names})")
        rows = pq.read_table(p, columns=[key]).column(key).to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise ConfigError(f"data.path: {p} is not a readable parquet file ({e})") from None
    for i, value in enumerate(rows):
        _check_prompt(value, f"{p}: row {i}", key)
    return rows


def read_prompt_file(path: str, prompt_key: str = "prompt") -> list:
    """Raw prompts of a JSONL or parquet file, every record checked (``ConfigError`` naming file:line)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"data.path: path does not exist: {path}")
    if not p.is_file():
        raise ConfigError(f"data.path: not a file: {path}")
    rows = _read_parquet(p, prompt_key) if p.suffix == ".parquet" else _read_jsonl(p, prompt_key)
    if not rows:
        raise ConfigError(f"data.path: {path} holds no prompts")
    return rows


def check_prompts(data) -> int:
    """Validate the prompts of ``data`` (a ``DataConfig``) before any work; returns their count.

    Built-in sets need only a known name; files must parse, every record must hold
    ``data.prompt_key`` (a string or chat messages) and there must be at least one. Reads only.
    """
    check_builtin(data.path)
    if data.path in BUILTINS:
        return data.num_builtin
    return len(read_prompt_file(data.path, data.prompt_key))


def load_prompts(path: str, prompt_key: str = "prompt", num_builtin: int = 256) -> list:
    """Raw prompts (strings or chat message lists) from JSONL, parquet or ``builtin:arith``."""
    check_builtin(path)
    if path in BUILTINS:
        return BUILTINS[path](num_builtin)
    return read_prompt_file(path, prompt_key)


def render_prompt(prompt, tokenizer, chat_template: bool = True, think_prefill: bool = False) -> str:
    """The text the policy continues: chat template with a generation prompt, optional ``<think>`` prefill."""
    if chat_template:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    if think_prefill and not text.endswith(THINK_PREFILL):
        text += THINK_PREFILL
    return text


def encode_prompts(prompts: list, tokenizer, chat_template: bool = True, think_prefill: bool = False,
                   max_tokens: int = 128) -> list[list[int]]:
    """Token ids per prompt (left-truncated to ``max_tokens``)."""
    out = []
    for pr in prompts:
        ids = tokenizer(render_prompt(pr, tokenizer, chat_template, think_prefill), add_special_tokens=False)["input_ids"]
        out.append(ids[-max_tokens:])
    return out


@dataclass
class PromptSampler:
    """Seeded epoch-wise permutation over ``n`` prompts."""

    n: int
    """Number of prompts."""
    seed: int
    """Permutation seed (epoch e uses seed + e)."""
    epoch: int = 0
    """Current epoch."""
    pos: int = 0
    """Position inside the current epoch's permutation."""

    def next(self, k: int) -> list[int]:
        """The next ``k`` prompt indices, wrapping into new epochs."""
        out: list[int] = []
        while len(out) < k:
            perm = np.random.default_rng(self.seed + self.epoch).permutation(self.n)
            take = perm[self.pos:self.pos + k - len(out)].tolist()
            out += take
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
