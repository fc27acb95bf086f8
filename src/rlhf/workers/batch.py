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
from typing import TYPE_CHECKING, Self

import torch

from rlhf.engines.base import Generation

if TYPE_CHECKING:
    from rlhf.config import PPOConfig


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

    def row_lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(real prompt tokens, real response tokens) per row, ``[B]`` int64 each."""
        P = self.prompt_len
        return self.attention_mask[:, :P].sum(1), self.mask.sum(1).long()

    def trimmed(self) -> Self:
        """The record without the columns that are padding in every row: the prompt block cut to
        the longest real prompt (``prompt_len`` becomes it), the response block to the longest
        response (at least one column); same class. Real tokens keep their positions and
        attention, so a model's outputs on them are those of the untrimmed record."""
        P, T = self.prompt_len, self.mask.shape[1]
        p_len, r_len = self.row_lengths()
        p2 = max(int(p_len.max()), 1) if p_len.numel() else P
        t2 = max(int(r_len.max()), 1) if r_len.numel() else T
        if (p2, t2) == (P, T):
            return self
        cols = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if not torch.is_tensor(v):
                continue
            cols[f.name] = v[:, P - p2:P + t2] if f.name in _FULL_WIDTH else v[:, :t2]
        return replace(self, **cols, prompt_len=p2)


_FULL_WIDTH = frozenset({"input_ids", "attention_mask", "position_ids"})
"""The ``[B, P+T]`` fields; every other tensor field of both records is ``[B, T]``."""


def token_budget_micro_batches(prompt_lens, response_lens, max_tokens: int, parts: int = 0) -> list[list[int]]:
    """Rows grouped into micro-batches whose padded size (rows x (longest prompt + longest
    response) of the group) stays within ``max_tokens``: rows sorted longest first (ties by row
    index), each added to the current group while the group's padded size allows, else a new
    group is opened. A row longer than the budget is a group of its own. ``parts`` > 0 asks for at
    least that many groups (data-parallel ranks must run the same number of micro-batches): the
    group with the most rows is halved until there are ``parts``, or every group is one row.
    Deterministic; pure (lists of ints in, lists of row indices out, each sorted)."""
    p = [int(x) for x in prompt_lens]
    r = [int(x) for x in response_lens]
    if len(p) != len(r):
        raise ValueError(f"token_budget_micro_batches: {len(p)} prompt lengths but {len(r)} response lengths")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(p)), key=lambda i: (-(p[i] + r[i]), i))
    groups: list[list[int]] = []
    cur: list[int] = []
    mp = mr = 0
    for i in order:
        np_, nr = max(mp, p[i]), max(mr, r[i])
        if cur and (len(cur) + 1) * (np_ + nr) > max_tokens:
            groups.append(cur)
            cur, np_, nr = [], p[i], r[i]
        cur.append(i)
        mp, mr = np_, nr
    if cur:
        groups.append(cur)
    def cost(g: list[int]) -> int:
        return len(g) * (max(p[i] for i in g) + max(r[i] for i in g)) if len(g) > 1 else -1

    while len(groups) < parts and any(len(g) > 1 for g in groups):
        k = max(range(len(groups)), key=lambda j: (cost(groups[j]), -j))
        g = groups[k]
        groups[k:k + 1] = [g[:len(g) // 2], g[len(g) // 2:]]
    return [sorted(g) for g in groups]


def forward_in_micro_batches(batch: RolloutBatch, groups: list[list[int]], fn) -> dict[str, torch.Tensor]:
    """``fn(sub)`` -> ``{name: [b, t] or [b] tensor}`` run on each group of rows of ``batch``
    (``token_budget_micro_batches``), each ``trimmed()``, put back in ``batch``'s row order and
    width: ``[B, T]`` outputs are zero beyond each group's own response width (there the mask
    is 0 anyway), ``[B]`` outputs are copied. An empty group runs ``fn`` on row 0 and drops the
    result (a rank with fewer groups than its peers keeps their collectives in step). The no-grad
    scoring passes use it."""
    B, T = batch.mask.shape
    out: dict[str, torch.Tensor] = {}
    for rows in groups:
        res = fn(batch.select_rows(rows or [0]).trimmed())
        if not rows:
            continue
        idx = torch.as_tensor(rows, dtype=torch.long)
        for k, v in res.items():
            v = v.detach().cpu()
            if k not in out:
                out[k] = torch.zeros((B, T) if v.dim() == 2 else (B,), dtype=v.dtype)
            if v.dim() == 2:
                out[k][idx, :v.shape[1]] = v
            else:
                out[k][idx] = v
    return out


def budget_groups(batch: RolloutBatch, max_tokens: int) -> list[list[int]]:
    """``token_budget_micro_batches`` of ``batch``'s rows (one process: no peers to match)."""
    p_len, r_len = batch.row_lengths()
    return token_budget_micro_batches(p_len.tolist(), r_len.tolist(), max_tokens)


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


def split(n: int, world: int) -> list[list[int]]:
    """Contiguous row shards, one per data-parallel rank."""
    k = n // world
    return [list(range(r * k, (r + 1) * k)) for r in range(world)]


def make_plans(cfg: PPOConfig, step: int, mask: torch.Tensor, world: int, loss_agg: str = "token_mean") -> list[list]:
    """Per rank (the trainer's plan of a step's PPO updates): for each epoch, the (rows, loss divisor) of each mini-batch; the divisor is the
    global mini-batch's token count, or rows x ``rollout.max_new_tokens`` for ``loss_agg``
    ``token_sum_norm`` (``rlhf.algo.estimators.loss_num_tokens``).

    Rows are shuffled per epoch with a generator seeded by (seed, step, epoch), so a resumed run
    trains on the same mini-batches. Each mini-batch is split contiguously over the ranks.
    """
    from rlhf.algo import loss_num_tokens

    B, mb = mask.shape[0], cfg.ppo.mini_batch_size
    plans: list[list] = [[] for _ in range(world)]
    for epoch in range(cfg.ppo.ppo_epochs):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 101 + epoch)
        perm = torch.randperm(B, generator=g).tolist()
        per_rank: list[list] = [[] for _ in range(world)]
        for i in range(0, B, mb):
            rows = perm[i:i + mb]
            ntok = loss_num_tokens(loss_agg, float(mask[rows].sum()), len(rows), cfg.rollout.max_new_tokens)
            for r, shard in enumerate(split(len(rows), world)):
                per_rank[r].append(([rows[j] for j in shard], ntok))
        for r in range(world):
            plans[r].append(per_rank[r])
    return plans
