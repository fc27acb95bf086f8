"""Token-level rewards, GAE advantages and returns, and the KL-coefficient controller.

Shapes: ``[B, T]`` response-aligned tensors with ``mask`` 1.0 on response tokens (including
EOS) and 0.0 on padding; padding may be on either side. See DESIGN.md "Shared definitions".
"""

from __future__ import annotations

import torch

from rlhf.algo.kl import kl_penalty


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index [B] of the last masked-in token of each row (EOS, or the last token when truncated).

    Works for left and right padding. Raises ValueError naming the row when a row is all padding.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    present = mask != 0
    empty = ~present.any(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"mask rows {rows[:8]} have no response token (every response has >= 1, its EOS)")
    T = mask.shape[1]
    return T - 1 - present.flip(1).int().argmax(dim=1)


def token_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float, kl_kind: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: ``-kl_coef * k(logp - ref_logp)`` on each response token, plus the
    reward-model ``scores[b]`` on the last response token of row b. Never on padding.

    Returns ``(rewards [B, T], kl [B, T])`` with ``kl`` the unscaled per-token estimate, both
    zero on padding. ``logp`` is the sampling policy's (old) logprob of the taken tokens.
    """
    if logp.shape != mask.shape or ref_logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, ref_logp {tuple(ref_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must share one [B, T] shape")
    if scores.shape != mask.shape[:1]:
        raise ValueError(f"scores must be [B]={mask.shape[0]}, got shape {tuple(scores.shape)}")
    last = last_token_index(mask)
    on = mask != 0
    kl = kl_penalty(logp, ref_logp, kl_kind)
    kl = torch.where(on, kl, torch.zeros_like(kl))
    rewards = -kl_coef * kl
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the masked tokens of each row.

    delta_t = r_t + gamma V_{t'} - V_t and A_t = delta_t + gamma lam A_{t'}, where t' is the next
    masked-in token of the same row (V = A = 0 past the last one). Masked-out positions are
    skipped, so left/right padding and holes inside a response are handled alike. Returns
    ``(advantages, returns)`` with returns = A + V; both are zero on padding. Vectorized over the
    batch, one step per token position; computed in float32 without gradients.
    """
    if rewards.shape != mask.shape or values.shape != mask.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} must share one [B, T] shape")
    with torch.no_grad():
        # time-major copies make each step's column a contiguous row (about 1.5x faster on CPU)
        on = (mask != 0).t().contiguous()
        r = rewards.float().t().contiguous()
        v = values.float().t().contiguous()
        T, B = r.shape
        zero = torch.zeros((), dtype=torch.float32, device=r.device)
        next_value = torch.zeros(B, dtype=torch.float32, device=r.device)
        next_adv = torch.zeros_like(next_value)
        adv_tm = torch.zeros_like(r)
        for t in range(T - 1, -1, -1):
            a_t = r[t] + gamma * next_value - v[t] + gamma * lam * next_adv
            m = on[t]
            adv_tm[t] = torch.where(m, a_t, zero)
            next_value = torch.where(m, v[t], next_value)
            next_adv = torch.where(m, a_t, next_adv)
        adv = adv_tm.t().contiguous()
        returns = torch.where(mask != 0, adv + values.float(), zero)
    return adv, returns


def adaptive_kl_coef(kl_coef: float, observed_kl: float, target_kl: float, horizon: int,
                     n_steps: int) -> float:
    """Adaptive KL controller (Ziegler et al. 2019): ``coef * (1 + clip(kl/target - 1, +-0.2) * n/horizon)``.

    ``n_steps`` is the number of samples (responses) the observed KL was measured on.
    """
    if target_kl <= 0 or horizon <= 0:
        raise ValueError(f"target_kl and horizon must be > 0, got {target_kl}, {horizon}")
    err = max(-0.2, min(0.2, observed_kl / target_kl - 1.0))
    return kl_coef * (1.0 + err * n_steps / horizon)
