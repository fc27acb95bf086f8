"""Advantage estimators, one pure function each, selected by name from ``ESTIMATORS``.

Every estimator takes one ``AdvantageInputs`` and returns an ``AdvantageResult``: response-token
advantages [B, T] (zero on padding) for the policy loss and, only when the estimator trains a
critic, the critic's regression targets ``returns`` [B, T]. The registry entry (``Estimator``)
says what else the trainer must do: spawn and train a critic (``needs_critic``), form groups of
``n_samples_per_prompt`` responses per prompt (``needs_groups``), apply ``ppo.whiten_advantages``
on top (``trainer_whitens``, GAE only: the others already fix their own scale) and which token
aggregation the policy loss should use (``loss_agg``, see ``LOSS_AGGS``).

Groups: the trainer repeats each prompt ``n`` times in a row (``for i in idx for _ in range(n)``),
so rows ``[k n, (k + 1) n)`` share a prompt; ``group_ids`` overrides that (any integer labels).
Group statistics are computed in float64, so a group whose rewards are all equal gets exactly
zero advantage (no 0/0, no NaN, no rounding residue divided by eps).

Estimators (r_i: the scalar reward of response i, G: its group, n = |G|):

* ``gae``: PPO's generalized advantage estimation on KL-shaped token rewards with a critic
  (Schulman et al. 2016, arXiv:1506.02438; Ouyang et al. 2022 for the RLHF token reward).
* ``grpo``: A_i = (r_i - mean_G r) / (std_G r + eps), std Bessel-corrected, broadcast to every
  response token (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, "outcome supervision").
* ``dr_grpo``: A_i = r_i - mean_G r, no std division, with a length-unbiased loss: token losses
  summed and divided by a constant (rows x generation budget), not by each response's length
  (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective", arXiv:2503.20783).
* ``rloo``: A_i = r_i - (1 / (n - 1)) sum_{j in G, j != i} r_j, the leave-one-out baseline
  (Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"; Ahmadian et al. 2024,
  "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in
  LLMs", arXiv:2402.14740).
* ``reinforce_pp``: G_t = sum_{k >= t} gamma^{k - t} r_k over the KL-shaped token rewards, then
  whitened over all response tokens of the batch (Hu 2025, "REINFORCE++: A Simple and Efficient
  Approach for Aligning Large Language Models", arXiv:2501.03262). No critic, no groups.

Imports torch only (``tests/test_layers.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rlhf.algo.advantages import gae, gae_pair
from rlhf.algo.masked import masked_whiten

LOSS_AGGS = ("token_mean", "token_sum_norm")
"""Policy-loss token aggregations: ``token_mean`` = sum of token losses / response tokens of the
global mini-batch (``aggregate_token_loss(num_tokens=tokens)``, today's PPO); ``token_sum_norm`` =
sum / (rows of the global mini-batch x ``rollout.max_new_tokens``), the same call with
``num_tokens=rows * max_new_tokens`` (Dr. GRPO: every token weighs the same whatever its
response's length)."""


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may read. Each estimator checks that the fields it needs are set.

    mask: [B, T] response mask, 1.0 on response tokens (including EOS), 0.0 on padding.
    scores: [B] scalar reward per response (after the trainer's clip / missing-EOS penalty /
        normalization). Group estimators use it; pass ``token_rewards.sum(1)`` instead to fold
        the KL penalty into the sequence reward (the RLOO paper's choice).
    token_rewards: [B, T] per-token rewards from ``token_rewards`` (-kl_coef KL on every token,
        the score on the last one); ``gae`` and ``reinforce_pp`` use it.
    values: [B, T] critic values of the old policy; ``gae`` only.
    n_samples_per_prompt: responses per prompt (>= 2 for the group estimators); consecutive rows.
    group_ids: optional [B] integer group label per row, overriding ``n_samples_per_prompt``.
    gamma: discount in [0, 1] (``gae``, ``reinforce_pp``).
    lam_actor: GAE lambda in [0, 1] of the policy's advantages.
    lam_critic: GAE lambda in [0, 1] of the critic's returns.
    eps: > 0, added to the group std (``grpo``).
    """

    mask: torch.Tensor
    scores: torch.Tensor | None = None
    token_rewards: torch.Tensor | None = None
    values: torch.Tensor | None = None
    n_samples_per_prompt: int = 1
    group_ids: torch.Tensor | None = None
    gamma: float = 1.0
    lam_actor: float = 0.95
    lam_critic: float = 0.95
    eps: float = 1e-6


@dataclass(frozen=True)
class AdvantageResult:
    """advantages: [B, T] float32, zero on padding. returns: [B, T] critic targets, or None."""

    advantages: torch.Tensor
    returns: torch.Tensor | None = None


@dataclass(frozen=True)
class Estimator:
    """A registry entry: the function and what the trainer must do around it."""

    name: str
    fn: Callable[[AdvantageInputs], AdvantageResult]
    needs_critic: bool
    needs_groups: bool
    trainer_whitens: bool
    loss_agg: str
    reference: str


def _require(inp: AdvantageInputs, name: str, *fields: str) -> None:
    missing = [f for f in fields if getattr(inp, f) is None]
    if missing:
        raise ValueError(f"advantage estimator {name!r} needs {', '.join(missing)} (got None)")
    mask = inp.mask
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    for f in fields:
        t = getattr(inp, f)
        want = mask.shape[:1] if f == "scores" else mask.shape
        if t.shape != want:
            raise ValueError(f"{f} has shape {tuple(t.shape)}, expected {tuple(want)} (mask {tuple(mask.shape)})")
    if "scores" in fields and not bool(torch.isfinite(inp.scores).all()):
        raise ValueError(f"scores hold NaN or inf ({name!r}): {inp.scores.tolist()[:8]}")


def group_ids_for(batch: int, n_samples_per_prompt: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Group label per row for prompts repeated ``n`` times in a row: ``[0]*n + [1]*n + ...``."""
    n = n_samples_per_prompt
    if n < 1 or batch % n:
        raise ValueError(f"batch {batch} is not a whole number of groups of n_samples_per_prompt={n}")
    return torch.arange(batch, device=device) // n


def _groups(inp: AdvantageInputs, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inverse index [B] into groups, group sizes [G]); every group has >= 2 members."""
    B = inp.mask.shape[0]
    if inp.group_ids is None:
        if inp.n_samples_per_prompt < 2:
            raise ValueError(f"advantage estimator {name!r} compares responses to the same prompt: "
                             f"n_samples_per_prompt must be >= 2, got {inp.n_samples_per_prompt}")
        ids = group_ids_for(B, inp.n_samples_per_prompt, inp.mask.device)
    else:
        ids = inp.group_ids
        if ids.shape != (B,) or ids.is_floating_point():
            raise ValueError(f"group_ids must be an integer [B]={B} tensor, got {ids.dtype} {tuple(ids.shape)}")
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    if bool((counts < 2).any()):
        raise ValueError(f"advantage estimator {name!r} needs >= 2 responses per group; group sizes "
                         f"{sorted(set(counts.tolist()))}")
    return inverse, counts


def _group_sum(x: torch.Tensor, inverse: torch.Tensor, n_groups: int) -> torch.Tensor:
    return torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, inverse, x)


def _broadcast(per_row: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, T] float32 on response tokens, 0 on padding."""
    zero = torch.zeros((), dtype=torch.float32, device=mask.device)
    return torch.where(mask != 0, per_row.float()[:, None], zero)


def gae_estimator(inp: AdvantageInputs) -> AdvantageResult:
    """PPO's GAE (Schulman et al. 2016): advantages with ``lam_actor``, critic returns with
    ``lam_critic``, on the KL-shaped token rewards; bitwise equal to two ``gae`` calls."""
    _require(inp, "gae", "token_rewards", "values")
    adv, returns = gae_pair(inp.token_rewards, inp.values, inp.mask, inp.gamma, inp.lam_actor, inp.lam_critic)
    return AdvantageResult(adv, returns)


def grpo_estimator(inp: AdvantageInputs) -> AdvantageResult:
    """GRPO (Shao et al. 2024): ``(r_i - mean_G) / (std_G + eps)`` per response, std with Bessel's
    correction (n - 1), the same value on each of its response tokens."""
    _require(inp, "grpo", "scores")
    if not inp.eps > 0:
        raise ValueError(f"grpo eps must be > 0, got {inp.eps}")
    inverse, counts = _groups(inp, "grpo")
    r = inp.scores.double()
    n = counts.double()
    mean = _group_sum(r, inverse, len(counts)) / n
    centered = r - mean[inverse]
    std = (_group_sum(centered * centered, inverse, len(counts)) / (n - 1)).sqrt()
    return AdvantageResult(_broadcast(centered / (std[inverse] + inp.eps), inp.mask))


def dr_grpo_estimator(inp: AdvantageInputs) -> AdvantageResult:
    """Dr. GRPO (Liu et al. 2025): ``r_i - mean_G`` (no std normalization); use it with the
    ``token_sum_norm`` loss aggregation (no division by each response's length)."""
    _require(inp, "dr_grpo", "scores")
    inverse, counts = _groups(inp, "dr_grpo")
    r = inp.scores.double()
    mean = _group_sum(r, inverse, len(counts)) / counts.double()
    return AdvantageResult(_broadcast(r - mean[inverse], inp.mask))


def rloo_estimator(inp: AdvantageInputs) -> AdvantageResult:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): ``r_i - (sum_G r - r_i) / (n - 1)``, the mean
    of the OTHER responses to the same prompt as the baseline (unbiased: independent of r_i)."""
    _require(inp, "rloo", "scores")
    inverse, counts = _groups(inp, "rloo")
    r = inp.scores.double()
    total = _group_sum(r, inverse, len(counts))
    baseline = (total[inverse] - r) / (counts.double()[inverse] - 1)
    return AdvantageResult(_broadcast(r - baseline, inp.mask))


def reinforce_pp_estimator(inp: AdvantageInputs) -> AdvantageResult:
    """REINFORCE++ (Hu 2025): discounted returns of the KL-shaped token rewards,
    ``G_t = r_t + gamma G_{t'}`` over each row's response tokens, whitened over the whole batch
    (masked mean and Bessel-corrected std of all response tokens)."""
    _require(inp, "reinforce_pp", "token_rewards")
    zeros = torch.zeros_like(inp.token_rewards, dtype=torch.float32)
    returns, _ = gae(inp.token_rewards, zeros, inp.mask, inp.gamma, 1.0)   # V = 0, lambda = 1
    return AdvantageResult(masked_whiten(returns, inp.mask))


ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    Estimator("gae", gae_estimator, needs_critic=True, needs_groups=False, trainer_whitens=True,
              loss_agg="token_mean", reference="Schulman et al. 2016, arXiv:1506.02438"),
    Estimator("grpo", grpo_estimator, needs_critic=False, needs_groups=True, trainer_whitens=False,
              loss_agg="token_mean", reference="Shao et al. 2024, arXiv:2402.03300"),
    Estimator("dr_grpo", dr_grpo_estimator, needs_critic=False, needs_groups=True, trainer_whitens=False,
              loss_agg="token_sum_norm", reference="Liu et al. 2025, arXiv:2503.20783"),
    Estimator("rloo", rloo_estimator, needs_critic=False, needs_groups=True, trainer_whitens=False,
              loss_agg="token_mean", reference="Ahmadian et al. 2024, arXiv:2402.14740"),
    Estimator("reinforce_pp", reinforce_pp_estimator, needs_critic=False, needs_groups=False,
              trainer_whitens=False, loss_agg="token_mean", reference="Hu 2025, arXiv:2501.03262"),
)}
ESTIMATOR_NAMES = tuple(ESTIMATORS)


def get_estimator(name: str) -> Estimator:
    """The registry entry ``name``; ValueError listing the known names otherwise."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {', '.join(ESTIMATOR_NAMES)}") from None


def compute_advantages(name: str, inputs: AdvantageInputs) -> AdvantageResult:
    """Run the estimator ``name`` on ``inputs`` (no gradients)."""
    est = get_estimator(name)
    with torch.no_grad():
        return est.fn(inputs)


def loss_num_tokens(loss_agg: str, tokens: float, rows: int, max_new_tokens: int) -> float:
    """The ``num_tokens`` to pass to ``policy_loss`` / ``aggregate_token_loss`` for ``loss_agg``:
    the global mini-batch's response tokens (``token_mean``) or rows x generation budget
    (``token_sum_norm``)."""
    if loss_agg == "token_mean":
        return float(tokens)
    if loss_agg == "token_sum_norm":
        if rows < 1 or max_new_tokens < 1:
            raise ValueError(f"token_sum_norm needs rows >= 1 and max_new_tokens >= 1, got {rows}, {max_new_tokens}")
        return float(rows * max_new_tokens)
    raise ValueError(f"unknown loss aggregation {loss_agg!r}; known: {', '.join(LOSS_AGGS)}")
