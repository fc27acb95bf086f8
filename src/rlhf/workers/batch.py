"""The batch layout shared by the trainer and the workers.

Prompts are left-padded to P tokens and responses right-padded to T tokens, so every response
starts at column P: the logits (and critic hidden states) at columns P-1 .. P+T-2 predict
response tokens 0 .. T-1. ``position_ids`` count real tokens only (what ``generate`` uses), so
trainer and rollout logprobs agree for left-padded rows.
"""

from __future__ import annotations

import torch

from rlhf.engines.base import Generation


def collate(gens: list[Generation], pad_id: int) -> dict:
    """Stack generations into the batch dict (tensors plus ``prompt_len`` P)."""
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
    return {"input_ids": ids, "attention_mask": attn, "position_ids": pos, "responses": ids[:, P:].clone(),
            "mask": mask, "rollout_logp": rollout_logp, "prompt_len": P}


def response_slice(x: torch.Tensor, batch: dict) -> torch.Tensor:
    """Columns P-1 .. P+T-2 of a ``[B, P+T, ...]`` model output: the predictions of the T response tokens."""
    P, T = batch["prompt_len"], batch["mask"].shape[1]
    return x[:, P - 1:P - 1 + T]


def select_rows(batch: dict, rows) -> dict:
    """The sub-batch of the given row indices (tensors indexed, scalars kept)."""
    idx = torch.as_tensor(list(rows), dtype=torch.long)
    return {k: (v.index_select(0, idx) if torch.is_tensor(v) else v) for k, v in batch.items()}


def to_device(batch: dict, device) -> dict:
    """The batch with every tensor on ``device`` (a no-op on CPU)."""
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
