"""The batch records the trainer and the workers pass between stages.

``RolloutBatch`` is what ``collate`` builds from the rollout's generations; ``ScoredBatch`` is that
batch plus what the driver computes from the scoring stage (old logprobs and values, advantages,
returns, importance weights), the input of the PPO updates. Both are frozen dataclasses of CPU
tensors and ints (picklable for Ray); ``select_rows`` and ``to`` return a record of the same class.

Prompts are left-padded to P tokens and responses right-padded to T tokens, so every response
starts at column P: the logits (and critic hidden states) at columns P-1 .. P+T-2 predict
response tokens 0 .. T-1. ``position_ids`` count real tokens only (what ``generate`` uses), so
trainer and rollout logprobs agree for left-padded rows.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Self

import torch

from rlhf.engines.base import Generation


@dataclass(frozen=True)
class RolloutBatch:
    """B generations, prompts left-padded to P and responses right-padded to T (``collate``)."""

    input_ids: torch.Tensor
    """``[B, P+T]`` int64: prompt then response tokens, pad id elsewhere."""
    attention_mask: torch.Tensor
    """``[B, P+T]`` int64: 1 on real prompt and response tokens, 0 on padding."""
    position_ids: torch.Tensor
    """``[B, P+T]`` int64: positions counting real tokens only (0 on left padding), as ``generate`` uses."""
    responses: torch.Tensor
    """``[B, T]`` int64: the response tokens (columns P.. of ``input_ids``), pad id after the end."""
    mask: torch.Tensor
    """``[B, T]`` float32: 1 on response tokens (EOS included), 0 on padding."""
    rollout_logp: torch.Tensor
    """``[B, T]`` float32: the rollout engine's sampling logprobs, 0 on padding."""
    prompt_len: int
    """P: the padded prompt length (column of the first response token)."""

    @property
    def num_rows(self) -> int:
        """B."""
        return int(self.mask.shape[0])

    def select_rows(self, rows) -> Self:
        """The record of the given row indices, same class (tensors indexed, ints and ``None`` kept)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        return replace(self, **{f.name: getattr(self, f.name).index_select(0, idx)
                                for f in fields(self) if torch.is_tensor(getattr(self, f.name))})

    def to(self, device) -> Self:
        """The record with every tensor on ``device``, same class (a no-op on the tensors' own device)."""
        return replace(self, **{f.name: getattr(self, f.name).to(device)
                                for f in fields(self) if torch.is_tensor(getattr(self, f.name))})

    def response_slice(self, x: torch.Tensor) -> torch.Tensor:
        """Columns P-1 .. P+T-2 of a ``[B, P+T, ...]`` model output: the predictions of the T response tokens."""
        P, T = self.prompt_len, self.mask.shape[1]
        return x[:, P - 1:P - 1 + T]


@dataclass(frozen=True)
class ScoredBatch(RolloutBatch):
    """A ``RolloutBatch`` plus the driver's scoring results: what the PPO losses read (``[B, T]``
    float32, 0 on padding)."""

    old_logp: torch.Tensor
    """Logprobs of the policy that sampled (the trainer's recomputation, or the rollout's with
    ``ppo.old_logp_source: rollout``): the PPO ratio's denominator."""
    old_values: torch.Tensor | None
    """Critic values before the update (the value-clip anchor); None without a critic."""
    returns: torch.Tensor | None
    """Critic targets: GAE with ``ppo.lam_critic``; None without a critic."""
    advantages: torch.Tensor
    """The ``ppo.advantage_estimator``'s advantages (GAE with ``ppo.lam_actor``, whitened over the
    batch when ``ppo.whiten_advantages``)."""
    is_weights: torch.Tensor | None = None
    """Per-token importance weights against the rollout engine (``ppo.tis_cap``, times the
    ``ppo.mismatch_reject`` keep mask), or ``None``: all ones."""

    @classmethod
    def of(cls, batch: RolloutBatch, **scored) -> "ScoredBatch":
        """``batch``'s tensors (shared, not copied) plus the scored fields."""
        return cls(**{f.name: getattr(batch, f.name) for f in fields(RolloutBatch)}, **scored)


def collate(gens: list[Generation], pad_id: int) -> RolloutBatch:
    """Stack generations into a ``RolloutBatch``."""
    P = max(len(g.prompt_ids) for g in gens)
    T = max(max(len(g.response_ids) for g in gens), 1)
    B = len(gens)
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.float32)
    rollout_logp = torch.zeros((B, T), dtype=torch.float32)
    for i, g in enumerate(gens):
        p, r = len(g.prompt_ids), len(g.response_ids)
        ids[i, P - p:P] = torch.tensor(g.prompt_ids)
        ids[i, P:P + r] = torch.tensor(g.response_ids, dtype=torch.long)
        attn[i, P - p:P + r] = 1
        mask[i, :r] = 1.0
        rollout_logp[i, :r] = torch.tensor(g.logprobs, dtype=torch.float32)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    return RolloutBatch(input_ids=ids, attention_mask=attn, position_ids=pos, responses=ids[:, P:].clone(),
                        mask=mask, rollout_logp=rollout_logp, prompt_len=P)
