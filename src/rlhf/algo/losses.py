"""PPO clipped policy loss and clipped value loss with DP/micro-batch-invariant aggregation.

Aggregation: the per-token losses of a micro-batch are summed and divided by ``num_tokens``,
the response-token count of the GLOBAL mini-batch (all data-parallel ranks, all
micro-batches), then multiplied by ``dp_world_size``. Summing the micro-batch losses (gradient
accumulation) and averaging gradients over DP ranks (what DeepSpeed/DDP all-reduce does) then
gives exactly the gradient of the token-mean over the unsplit mini-batch. With
``num_tokens=None`` the loss is the local token mean (single process, one micro-batch).
"""

from __future__ import annotations

import torch

from rlhf.algo.kl import kl_penalty
from rlhf.algo.masked import masked_mean, masked_sum

RATIO_LOGCLAMP = 20.0


def aggregate_token_loss(per_token: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None,
                         dp_world_size: int = 1) -> torch.Tensor:
    """``sum(per_token * mask) / num_tokens * dp_world_size``; the local token mean when
    ``num_tokens`` is None. Use it for any extra token-level loss term (entropy bonus, KL loss)."""
    if num_tokens is None:
        return masked_mean(per_token, mask)
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    return masked_sum(per_token, mask) / float(num_tokens) * dp_world_size


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None,
                num_tokens: float | None = None, dp_world_size: int = 1,
                is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate: per token ``max(-ratio A, -clip(ratio, 1-clip_low, 1+clip_high) A)``.

    ``dual_clip`` (c > 1, Ye et al. 2019) caps the loss of negative-advantage tokens at ``-c A``.
    ``is_weights`` (detached, e.g. truncated importance weights pi_old / pi_rollout) multiply the
    per-token loss. The log-ratio is clamped to +-20 before exp. Returns ``(loss, stats)``; stats
    are detached local token means: ``clipfrac`` (clipped branch active), ``dual_clipfrac``,
    ``approx_kl`` (k3 of KL(old || new), the per-token ``kl/policy_vs_sampling``), ``ratio_mean``,
    ``ratio_max`` and ``tokens`` (local token count, to weight stats across micro-batches).
    """
    if not (logp.shape == old_logp.shape == advantages.shape == mask.shape):
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, advantages "
                         f"{tuple(advantages.shape)} and mask {tuple(mask.shape)} must share one shape")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    log_ratio = (logp.float() - old_logp.float()).clamp(-RATIO_LOGCLAMP, RATIO_LOGCLAMP)
    ratio = torch.exp(log_ratio)
    adv = advantages.float()
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(loss1, loss2)
    dual_active = torch.zeros_like(per_token, dtype=torch.bool)
    if dual_clip is not None:
        loss3 = -adv * dual_clip
        dual_active = (adv < 0) & (loss3 < per_token)
        per_token = torch.where(adv < 0, torch.minimum(per_token, loss3), per_token)
    if is_weights is not None:
        per_token = per_token * is_weights.detach().float()
    loss = aggregate_token_loss(per_token, mask, num_tokens, dp_world_size)
    with torch.no_grad():
        on = mask != 0
        stats = {
            "clipfrac": masked_mean((loss2 > loss1).float(), mask),
            "dual_clipfrac": masked_mean(dual_active.float(), mask),
            "approx_kl": masked_mean(kl_penalty(old_logp.detach(), logp.detach(), "k3"), mask),
            "ratio_mean": masked_mean(ratio.detach(), mask),
            "ratio_max": torch.where(on, ratio.detach(), torch.full_like(ratio, -torch.inf)).max(),
            "tokens": mask.sum().float(),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None = 0.2, num_tokens: float | None = None,
               dp_world_size: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: ``0.5 max((V - R)^2, (V_old + clip(V - V_old, +-clip) - R)^2)`` per token.

    ``clip=None`` gives the plain ``0.5 (V - R)^2``. Aggregated like ``policy_loss``. Stats
    (detached local token means): ``vf_clipfrac`` (the clip binds and its branch is strictly larger),
    ``value_mean``, ``value_error`` (mean squared error of V to R), ``tokens``.
    """
    if not (values.shape == old_values.shape == returns.shape == mask.shape):
        raise ValueError(f"values {tuple(values.shape)}, old_values {tuple(old_values.shape)}, returns "
                         f"{tuple(returns.shape)} and mask {tuple(mask.shape)} must share one shape")
    v = values.float()
    ret = returns.float()
    err1 = (v - ret).pow(2)
    if clip is None:
        per_token = 0.5 * err1
        clipped = torch.zeros_like(err1, dtype=torch.bool)
    else:
        old = old_values.float()
        beyond = (v - old).abs() > clip  # V itself where the clip does not bind: no rounding of V_old + (V - V_old)
        v_clipped = torch.where(beyond, old + (v - old).clamp(-clip, clip), v)
        err2 = (v_clipped - ret).pow(2)
        per_token = 0.5 * torch.maximum(err1, err2)
        clipped = err2 > err1
    loss = aggregate_token_loss(per_token, mask, num_tokens, dp_world_size)
    with torch.no_grad():
        stats = {
            "vf_clipfrac": masked_mean(clipped.float(), mask),
            "value_mean": masked_mean(v.detach(), mask),
            "value_error": masked_mean(err1.detach(), mask),
            "tokens": mask.sum().float(),
        }
    return loss, stats


def truncated_is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                         cap: float = 2.0) -> torch.Tensor:
    """Truncated importance weights ``min(exp(old_logp - rollout_logp), cap)`` (detached, 0 on padding).

    Corrects the rollout-engine vs trainer mismatch (Yao et al., "off-policy RL"); pass the
    result as ``policy_loss(..., is_weights=...)``.
    """
    if old_logp.shape != rollout_logp.shape or old_logp.shape != mask.shape:
        raise ValueError(f"old_logp {tuple(old_logp.shape)}, rollout_logp {tuple(rollout_logp.shape)} and "
                         f"mask {tuple(mask.shape)} must share one shape")
    with torch.no_grad():
        lr = (old_logp.float() - rollout_logp.float()).clamp(-RATIO_LOGCLAMP, RATIO_LOGCLAMP)
        w = torch.exp(lr).clamp(max=cap)
        return torch.where(mask != 0, w, torch.zeros_like(w))


def mismatch_keep_mask(trainer_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                       threshold: float) -> torch.Tensor:
    """Sequence-level rejection of rollout/trainer mismatch (masked importance sampling).

    For each sequence, the mismatch is the token mean of k3(x) = exp(-x) - 1 + x with
    x = rollout_logp - trainer_logp over its response tokens (the per-sequence version of
    ``kl/rollout_vs_trainer``). Returns ``[B, T]`` float weights: 1 on the response tokens of
    sequences whose mismatch is <= ``threshold``, 0 on rejected sequences and on padding. Multiply it
    into the importance weights (``policy_loss(..., is_weights=...)``): rejected sequences then
    contribute no policy gradient, while the loss normalisation (global token count) is unchanged.
    """
    if trainer_logp.shape != rollout_logp.shape or trainer_logp.shape != mask.shape:
        raise ValueError(f"trainer_logp {tuple(trainer_logp.shape)}, rollout_logp {tuple(rollout_logp.shape)} and "
                         f"mask {tuple(mask.shape)} must share one shape")
    with torch.no_grad():
        m = (mask != 0).float()
        x = (rollout_logp.float() - trainer_logp.float()).clamp(-RATIO_LOGCLAMP, RATIO_LOGCLAMP) * m
        k3 = (torch.exp(-x) - 1 + x) * m
        per_seq = k3.sum(-1) / m.sum(-1).clamp(min=1)
        keep = (per_seq <= threshold).float()
        return keep[:, None] * m
