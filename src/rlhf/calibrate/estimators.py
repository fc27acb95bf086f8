"""Reasoning-rate estimators rho(M_a, D_cal) (equation 4) on a loaded model.

A response "reasons" when its reasoning block is opened and holds non-whitespace content
before the end-of-reasoning marker (ThinkPack's "valid reasoning"). A missing block (an
emit-style model that never emits ``<think>``) and an empty block both count as no reasoning.

- ``logit_rate``: one forward pass per prompt over prompt + empty path (``DecisionPath``).
  P(empty) = P(close path | open) and P(non-empty)_i = P(open) * (1 - P(empty)); the
  estimate reports both ``rho_mean`` = mean_i P(non-empty)_i and ``rho_count`` = fraction of
  prompts with P(non-empty)_i > threshold.
- ``prefix_rate``: sample the first k tokens after the generation prompt and classify them
  (``classify``): the paper's short-prefix evaluation.
- ``full_rate``: sample whole responses (the paper's baseline; used by the benchmark).

Agreement: the sampled prefix rate is an unbiased estimate of ``rho_mean`` as long as the
canonical empty path is the only way the model closes a blank trace, so the two differ by
sampling noise, about sqrt(rho (1 - rho) / (prompts x samples)) (at most 0.5 / sqrt(n)).

Every estimate counts the model's forward calls (``forward_calls``) and the sequences they
processed (``forward_rows``), through a forward hook on the model.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from .data import DecisionPath


@dataclass
class RateEstimate:
    """One estimate of the reasoning rate on the calibration set."""

    estimator: str
    """``logit``, ``prefix`` or ``full``."""
    rho: float
    """The estimate used by the search (``rho_mean`` or ``rho_count`` for logit; sampled rate otherwise)."""
    rho_mean: float
    """Mean over prompts of the per-prompt reasoning probability (logit) or sampled share."""
    rho_count: float
    """Share of prompts whose reasoning probability / sampled share exceeds the threshold."""
    per_prompt: list[float] = field(default_factory=list)
    """Per-prompt reasoning probability (logit) or share of reasoning samples (sampling)."""
    forward_calls: int = 0
    """Model forward calls made."""
    forward_rows: int = 0
    """Sequences processed summed over forward calls (one per prompt per call)."""
    generated_tokens: int = 0
    """Tokens sampled (sampling estimators)."""
    seconds: float = 0.0
    """Wall time of the estimate."""


def _inner(model):
    """The transformers model under a peft wrapper (hooked once per forward)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def count_forwards(model):
    """Count forward calls and rows of ``model``; yields a dict updated in place."""
    counts = {"calls": 0, "rows": 0}

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        counts["calls"] += 1
        counts["rows"] += int(ids.shape[0]) if ids is not None else 0

    handle = _inner(model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counts
    finally:
        handle.remove()


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def logit_rate(model, prompts: list[list[int]], paths: list[DecisionPath], *, pad_id: int,
               batch_size: int = 16, threshold: float = 0.5, statistic: str = "mean") -> RateEstimate:
    """Probability of the empty-trace path at the decision point, one forward pass per prompt.

    Sequences are right-padded (no position shift for real tokens); the log-probabilities of the
    open and close tokens are read at their own positions.
    """
    t0 = time.perf_counter()
    dev = _device(model)
    probs: list[float] = []
    with count_forwards(model) as counts:
        for b in range(0, len(prompts), batch_size):
            seqs = [list(p) + list(path.ids) for p, path in zip(prompts[b:b + batch_size], paths[b:b + batch_size])]
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, s in enumerate(seqs):
                ids[r, :len(s)] = torch.tensor(s)
                mask[r, :len(s)] = 1
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            for r, (prompt, path) in enumerate(zip(prompts[b:b + batch_size], paths[b:b + batch_size])):
                n_p, n_o = len(prompt), len(path.open_ids)
                pos = torch.arange(n_p - 1, n_p - 1 + len(path.ids), device=dev)
                tok = torch.tensor(path.ids, device=dev)
                lp = logp[r, pos, tok]
                p_open = float(lp[:n_o].sum().exp())
                p_empty = float(lp[n_o:].sum().exp())
                probs.append(p_open * (1.0 - p_empty))
    rho_mean = sum(probs) / len(probs)
    rho_count = sum(p > threshold for p in probs) / len(probs)
    return RateEstimate("logit", rho_mean if statistic == "mean" else rho_count, rho_mean, rho_count, probs,
                        counts["calls"], counts["rows"], 0, time.perf_counter() - t0)


def classify(response: list[int], path: DecisionPath, whitespace_ids: set[int]) -> bool:
    """True when a (possibly partial) response begins a non-empty reasoning trace.

    Prefilled templates are already inside the block. Otherwise the first non-whitespace token
    must be the start marker. The trace is non-empty when a non-whitespace token comes before
    the end marker (or before the window ends).
    """
    i = 0
    if not path.prefilled:
        while i < len(response) and response[i] in whitespace_ids:
            i += 1
        if i >= len(response) or response[i] != path.start_id:
            return False
        i += 1
    for tok in response[i:]:
        if tok == path.end_id:
            return False
        if tok not in whitespace_ids:
            return True
    return False


def whitespace_token_ids(tokenizer) -> set[int]:
    """Ids of vocabulary tokens that decode to whitespace only."""
    specials = set(tokenizer.all_special_ids)
    out = set()
    for tok_id in range(len(tokenizer)):
        if tok_id not in specials and tokenizer.decode([tok_id]).strip() == "":
            out.add(tok_id)
    return out


@torch.no_grad()
def sample_rate(model, prompts: list[list[int]], paths: list[DecisionPath], *, pad_id: int, eos_id: int,
                whitespace_ids: set[int], max_new_tokens: int, samples: int = 1, temperature: float = 1.0,
                batch_size: int = 16, threshold: float = 0.5, seed: int = 0,
                estimator: str = "prefix") -> RateEstimate:
    """Sample ``samples`` responses of at most ``max_new_tokens`` per prompt and classify them.

    With ``max_new_tokens`` = k this is the short-prefix estimator; with a full response budget
    it is the paper's baseline (``estimator="full"``). Temperature 0 means greedy, one sample.
    """
    t0 = time.perf_counter()
    dev = _device(model)
    greedy = temperature == 0
    n = 1 if greedy else samples
    torch.manual_seed(seed)
    shares: list[float] = []
    generated = 0
    with count_forwards(model) as counts:
        for b in range(0, len(prompts), batch_size):
            chunk = prompts[b:b + batch_size]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(chunk):  # left padding for generation
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            kwargs = {"do_sample": False} if greedy else {"do_sample": True, "temperature": float(temperature),
                                                          "top_p": 1.0, "top_k": 0}
            out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                                 num_return_sequences=n, pad_token_id=pad_id, eos_token_id=eos_id, **kwargs)
            resp = out[:, width:].tolist()
            for r in range(len(chunk)):
                path = paths[b + r]
                votes = []
                for s in range(n):
                    seq = resp[r * n + s]
                    if eos_id in seq:
                        seq = seq[: seq.index(eos_id) + 1]
                    seq = [t for t in seq if t != pad_id]
                    generated += len(seq)
                    votes.append(classify(seq, path, whitespace_ids))
                shares.append(sum(votes) / n)
    rho_mean = sum(shares) / len(shares)
    rho_count = sum(s > threshold for s in shares) / len(shares)
    return RateEstimate(estimator, rho_mean, rho_mean, rho_count, shares, counts["calls"], counts["rows"],
                        generated, time.perf_counter() - t0)
