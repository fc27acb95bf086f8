"""Prompts: JSONL / parquet files (or a built-in arithmetic set), chat template, ``<think>`` prefill.

``load_prompts`` reads the raw prompts; ``encode_prompts`` renders and tokenizes them once;
``PromptSampler`` walks a seeded permutation epoch by epoch and its ``state_dict`` (epoch,
position) is all an exact resume needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

THINK_PREFILL = "<think>\n"


def builtin_arith(n: int, seed: int = 1234) -> list[str]:
    """``n`` deterministic arithmetic questions (the demo's prompt set)."""
    rng = np.random.default_rng(seed)
    return [f"Question: what is {a} plus {b}?" for a, b in rng.integers(0, 50, size=(n, 2)).tolist()]


def load_prompts(path: str, prompt_key: str = "prompt", num_builtin: int = 256) -> list:
    """Raw prompts (strings or chat message lists) from JSONL, parquet or ``builtin:arith``."""
    if path == "builtin:arith":
        return builtin_arith(num_builtin)
    if path.startswith("builtin:"):
        raise ValueError(f"data.path: unknown built-in prompt set {path!r}; use builtin:arith")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data.path: {path} does not exist")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        if prompt_key not in table.column_names:
            raise ValueError(f"data.prompt_key: column {prompt_key!r} not in {path} (columns: {table.column_names})")
        rows = table.column(prompt_key).to_pylist()
    else:
        rows = []
        for i, line in enumerate(p.read_text().splitlines()):
            if not line.strip():
                continue
            rec = json.loads(line)
            if prompt_key not in rec:
                raise ValueError(f"data.prompt_key: line {i + 1} of {path} has no {prompt_key!r} field")
            rows.append(rec[prompt_key])
    if not rows:
        raise ValueError(f"data.path: {path} holds no prompts")
    return rows


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
