"""The driver's per-step PPO math in one call: token rewards, both GAE passes and whitening.

``ppo_advantages`` returns exactly (bitwise) what the separate calls return::

    rewards, kl = token_rewards(scores, logp, ref_logp, mask, kl_coef, kl_kind)
    advantages, _ = gae(rewards, values, mask, gamma, lam_actor)
    _, returns = gae(rewards, values, mask, gamma, lam_critic)
    whitened = masked_whiten(advantages, mask)

but analyses the mask once (boolean forms, last token per row, holes, left padding), runs one
reverse recursion for both lambdas on time-major float32 and whitens with fused masked
reductions. At the paper's size (4096 x 2000) this is the serial work the driver does per step
besides ``batch_metrics`` (``benchmarks/driver_math.py`` measures it against the previous code).

``step_advantages`` is what the trainer calls each step: ``ppo.advantage_estimator`` picks the
estimator (``rlhf.algo.estimators``); ``gae`` runs the separate calls above, the others the
registry's function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.algo.advantages import (
    _advantages_out, _check_reward_inputs, _gae_time_major, _returns_out, _token_rewards, gae, mask_layout,
    token_rewards,
)
from rlhf.algo.estimators import AdvantageInputs, compute_advantages, get_estimator
from rlhf.algo.masked import _masked_whiten, masked_whiten


@dataclass(frozen=True)
class DriverAdvantages:
    """rewards / kl: [B, T] token rewards and unscaled per-token KL (``token_rewards``);
    advantages: GAE with ``lam_actor`` (unwhitened; ``step_advantages``: the estimator's);
    returns: critic targets with ``lam_critic`` (None without a critic); whitened:
    ``masked_whiten(advantages, mask)``, or None when not asked for. All float32 [B, T] and zero
    on padding."""

    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor | None
    whitened: torch.Tensor | None

    @property
    def train(self) -> torch.Tensor:
        """What the policy loss reads: ``whitened`` when computed, else ``advantages``."""
        return self.advantages if self.whitened is None else self.whitened


def ppo_advantages(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, values: torch.Tensor,
                   mask: torch.Tensor, *, kl_coef: float, kl_kind: str = "k1", gamma: float = 1.0,
                   lam_actor: float = 0.95, lam_critic: float = 0.95, whiten: bool = True) -> DriverAdvantages:
    """Token rewards, GAE advantages (``lam_actor``), critic returns (``lam_critic``) and the
    whitened advantages of one PPO batch; see the module docstring for the equivalent calls.

    scores: [B] reward per response; logp / ref_logp: [B, T] sampling-policy and reference
    logprobs; values: [B, T] critic values; mask: [B, T] response mask (every row >= 1 token).
    kl_coef >= 0; kl_kind in ``KL_KINDS``; gamma, lam_actor, lam_critic in [0, 1].
    """
    _check_reward_inputs(scores, logp, ref_logp, mask)
    with torch.no_grad():
        lay = mask_layout(mask)
        if not bool(lay.nonempty.all()):
            rows = (~lay.nonempty).nonzero().flatten().tolist()
            raise ValueError(f"mask rows {rows[:8]} have no response token (every response has >= 1, its EOS)")
        rewards, kl = _token_rewards(scores, logp, ref_logp, lay.on, lay.last, kl_coef, kl_kind)
        lams = (lam_actor,) if lam_actor == lam_critic else (lam_actor, lam_critic)
        adv_tm, lay, scratch = _gae_time_major(rewards, values, mask, gamma, lams, lay)
        advantages = _advantages_out(adv_tm[0], lay, scratch)
        returns = _returns_out(adv_tm[-1], values, lay, scratch)
        whitened = None
        if whiten:   # the time-major buffer is free now: the whitening's squares go there
            sq = adv_tm[0].view(advantages.shape) if adv_tm.numel() else None
            whitened = _masked_whiten(advantages, mask, lay.on, True, 1e-8, scratch=sq)
        del adv_tm, scratch
    return DriverAdvantages(rewards, kl, advantages, returns, whitened)


def step_advantages(estimator: str, scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                    values: torch.Tensor | None, mask: torch.Tensor, *, kl_coef: float, kl_kind: str = "k1",
                    gamma: float = 1.0, lam_actor: float = 0.95, lam_critic: float = 0.95, whiten: bool = True,
                    n_samples_per_prompt: int = 1, eps: float = 1e-6) -> DriverAdvantages:
    """One step's token rewards and advantages with the estimator named ``estimator``.

    ``gae``: ``token_rewards``, ``gae`` with ``lam_actor`` and with ``lam_critic`` and, when
    ``whiten``, ``masked_whiten`` (the same calls as before the registry, so the same bits).
    Others: the registry's function (``values`` unused, ``returns`` None, no whitening: they fix
    their own scale); the group estimators read the KL-shaped sequence reward
    ``token_rewards.sum(1)`` = score - kl_coef x summed KL, so ``ppo.kl_coef`` acts on every
    estimator (the RLOO paper's choice). Rows ``[k n, (k + 1) n)`` share a prompt.
    """
    est = get_estimator(estimator)
    rewards, kl = token_rewards(scores, logp, ref_logp, mask, kl_coef, kl_kind)
    if estimator == "gae":
        if values is None:
            raise ValueError("advantage estimator 'gae' needs the critic's values (got None)")
        adv, _ = gae(rewards, values, mask, gamma, lam_actor)
        _, returns = gae(rewards, values, mask, gamma, lam_critic)
        return DriverAdvantages(rewards, kl, adv, returns, masked_whiten(adv, mask) if whiten else None)
    inp = AdvantageInputs(mask=mask, scores=rewards.sum(1), token_rewards=rewards, values=values,
                          n_samples_per_prompt=n_samples_per_prompt, gamma=gamma, lam_actor=lam_actor,
                          lam_critic=lam_critic, eps=eps)
    res = compute_advantages(estimator, inp)
    whitened = masked_whiten(res.advantages, mask) if whiten and est.trainer_whitens else None
    return DriverAdvantages(rewards, kl, res.advantages, res.returns, whitened)
