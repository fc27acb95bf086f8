"""Token-level rewards, GAE advantages and returns, and the KL-coefficient controller.

Shapes: ``[B, T]`` response-aligned tensors with ``mask`` 1.0 on response tokens (including
EOS) and 0.0 on padding; padding may be on either side. See DESIGN.md "Shared definitions".
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf.algo.kl import kl_penalty


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index [B] of the last masked-in token of each row (EOS, or the last token when truncated).

    Works for left and right padding. Raises ValueError naming the row when a row is all padding.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    present = mask != 0
    T = mask.shape[1]
    # argmax returns the FIRST maximum: on the reversed row that is the last masked-in token; an
    # all-padding row gives index 0 of a zero, which the gather below detects (no extra pass)
    idx = T - 1 - present.flip(1).view(torch.uint8).argmax(dim=1)
    empty = ~present.gather(1, idx[:, None]).squeeze(1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"mask rows {rows[:8]} have no response token (every response has >= 1, its EOS)")
    return idx


def token_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float, kl_kind: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: ``-kl_coef * k(logp - ref_logp)`` on each response token, plus the
    reward-model ``scores[b]`` on the last response token of row b. Never on padding.

    Returns ``(rewards [B, T], kl [B, T])`` with ``kl`` the unscaled per-token estimate, both
    zero on padding. ``logp`` is the sampling policy's (old) logprob of the taken tokens.
    """
    _check_reward_inputs(scores, logp, ref_logp, mask)
    return _token_rewards(scores, logp, ref_logp, mask != 0, last_token_index(mask), kl_coef, kl_kind)


def _token_rewards(scores, logp, ref_logp, on, last, kl_coef, kl_kind):
    kl = kl_penalty(logp, ref_logp, kl_kind)     # a fresh tensor: zeroed in place (no extra [B, T] buffer)
    kl.masked_fill_(~on, 0.0)
    rewards = kl * (-kl_coef)
    rows = torch.arange(on.shape[0], device=on.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


def _check_reward_inputs(scores, logp, ref_logp, mask):
    if logp.shape != mask.shape or ref_logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, ref_logp {tuple(ref_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must share one [B, T] shape")
    if scores.shape != mask.shape[:1]:
        raise ValueError(f"scores must be [B]={mask.shape[0]}, got shape {tuple(scores.shape)}")


def _check_gae_inputs(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.dim() != 2 or rewards.shape != mask.shape or values.shape != mask.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} must share one [B, T] shape")


class MaskLayout(NamedTuple):
    """What the GAE paths need to know about a [B, T] mask, computed once (three byte passes)."""

    on: torch.Tensor          # bool [B, T], response tokens
    off: torch.Tensor         # bool [B, T], padding
    last: torch.Tensor        # int64 [B], last response token (T - 1 for an empty row)
    contiguous: bool          # every row's tokens form one run (no holes)
    left_pad: bool            # some non-empty row starts after position 0
    nonempty: torch.Tensor    # bool [B], rows with at least one response token


def mask_layout(mask: torch.Tensor) -> MaskLayout:
    """Analyse ``mask`` [B, T]: its boolean forms, each row's last token, holes and left padding."""
    on = mask != 0
    B, T = on.shape
    if T == 0:
        empty = torch.zeros(B, dtype=torch.long, device=mask.device)
        return MaskLayout(on, ~on, empty, True, False, torch.zeros(B, dtype=torch.bool, device=mask.device))
    u = on.view(torch.uint8)
    first = u.argmax(dim=1)                           # first maximum = first token (0 when empty)
    last = T - 1 - u.flip(1).argmax(dim=1)
    count = u.sum(dim=1, dtype=torch.int32)
    nonempty = count > 0
    contiguous = bool(((count == last - first + 1) | ~nonempty).all())
    left_pad = bool((nonempty & (first > 0)).any())
    return MaskLayout(on, ~on, last, contiguous, left_pad, nonempty)


def rows_are_contiguous(on: torch.Tensor) -> bool:
    """True when every row of the boolean ``on`` [B, T] holds at most one run of True (no holes)."""
    return mask_layout(on).contiguous


def _time_major_zeroed(x: torch.Tensor, on_tm: torch.Tensor) -> torch.Tensor:
    """``x`` [B, T] as a contiguous float32 [T, B] with zeros under the mask (NaN padding drops)."""
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    return torch.where(on_tm, x.float().t().contiguous(), zero)


def _gae_contiguous(rewards, values, lay, gamma, lams):
    """GAE for masks without holes: returns time-major advantages [L, T, B] (one per lambda),
    exact on response tokens and right padding, arbitrary on left padding.

    The TD errors are formed batch-major over the whole tensor (contiguous vector ops), with V = 0
    past each row's last response token and delta = 0 on padding, then transposed once; the
    recursion ``A_t = delta_t + (gamma lam) A_{t+1}`` is one multiply and one add per token
    position for all lambdas at once. The float operations per token are those of the masked
    recursion in the same order, ``((r_t + gamma V_{t+1}) - V_t) + (gamma lam) A_{t+1}``, so the
    results are bitwise equal to it.
    """
    on, off, last = lay.on, lay.off, lay.last
    B, T = on.shape
    L = len(lams)
    if T == 0:
        return torch.empty((L, 0, B), dtype=torch.float32, device=on.device), []
    r, v = rewards.float(), values.float()
    delta = torch.empty((B, T), dtype=torch.float32, device=r.device)
    if T > 1:
        torch.mul(v[:, 1:], gamma, out=delta[:, :-1])
    delta[:, T - 1] = 0.0
    delta.add_(r).sub_(v).masked_fill_(off, 0.0)
    # the last response token of each row has V_{t+1} = 0: delta = (r + 0) - v
    rows = torch.arange(B, device=r.device)
    r_last, v_last = r[rows, last], v[rows, last]
    delta[rows, last] = torch.where(on[rows, last], (r_last + 0.0) - v_last, torch.zeros_like(r_last))
    delta_tm = delta.t().contiguous()
    coef = torch.tensor([gamma * lam for lam in lams], dtype=torch.float32, device=r.device)[:, None]
    adv = torch.empty((L, T, B), dtype=torch.float32, device=r.device)
    if T:
        adv[:, T - 1] = delta_tm[T - 1]
    for t in range(T - 2, -1, -1):
        a = adv[:, t]
        torch.mul(adv[:, t + 1], coef, out=a)
        a.add_(delta_tm[t])
    return adv, [delta, delta_tm]


def _gae_masked(rewards, values, on, gamma, lams):
    """GAE for any mask (holes inside a response): the next masked-in token is carried explicitly.
    Same layout and results as ``_gae_contiguous``; one ``where`` per carried quantity per token."""
    on_tm = on.t().contiguous()
    r = _time_major_zeroed(rewards, on_tm)
    v = _time_major_zeroed(values, on_tm)
    T, B = r.shape
    L = len(lams)
    coef = torch.tensor([gamma * lam for lam in lams], dtype=torch.float32, device=r.device)[:, None]
    zero = torch.zeros((), dtype=torch.float32, device=r.device)
    next_value = torch.zeros(B, dtype=torch.float32, device=r.device)
    next_adv = torch.zeros((L, B), dtype=torch.float32, device=r.device)
    adv = torch.zeros((L, T, B), dtype=torch.float32, device=r.device)
    for t in range(T - 1, -1, -1):
        a_t = ((r[t] + gamma * next_value) - v[t]) + coef * next_adv
        m = on_tm[t]
        adv[:, t] = torch.where(m, a_t, zero)
        next_value = torch.where(m, v[t], next_value)
        next_adv = torch.where(m, a_t, next_adv)
    return adv, [r, v]


def _gae_time_major(rewards, values, mask, gamma, lams, lay=None):
    """Checked inputs -> (time-major advantages [L, T, B], mask layout, scratch).

    ``scratch``: float32 buffers of B x T elements the recursion no longer needs, with distinct
    storage (none is the advantages' buffer); the outputs are written into them, since a fresh
    [B, T] allocation costs several times the copy itself (page faults on first touch).
    """
    _check_gae_inputs(rewards, values, mask)
    lay = mask_layout(mask) if lay is None else lay
    if lay.contiguous:   # exact zeros on right padding; left padding is masked on the way out
        adv, scratch = _gae_contiguous(rewards, values, lay, gamma, lams)
    else:
        adv, scratch = _gae_masked(rewards, values, lay.on, gamma, lams)
        lay = lay._replace(left_pad=False)
    seen = {adv.data_ptr()}
    distinct = []
    for buf in scratch:                      # with B == 1 or T == 1 a transpose copy is a view
        if buf.is_contiguous() and buf.numel() == lay.on.numel() and buf.data_ptr() not in seen:
            seen.add(buf.data_ptr())
            distinct.append(buf)
    return adv, lay, distinct


def _batch_major(a_tm, scratch=None):
    """A contiguous [B, T] copy of a time-major [T, B] tensor, never a view of it: written into a
    buffer popped from ``scratch`` when one is left, else freshly allocated."""
    shape = a_tm.shape[::-1]
    out = scratch.pop().view(shape) if scratch else torch.empty(shape, dtype=a_tm.dtype, device=a_tm.device)
    return out.copy_(a_tm.t())


def _advantages_out(a_tm, lay, scratch=None):
    adv = _batch_major(a_tm, scratch)
    return adv.masked_fill_(lay.off, 0.0) if lay.left_pad else adv


def _returns_out(a_tm, values, lay, scratch=None):
    return _batch_major(a_tm, scratch).add_(values.float()).masked_fill_(lay.off, 0.0)


def gae_multi(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
              lams: tuple[float, ...] | list[float]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """GAE for several lambdas in ONE reverse pass (the same TD errors, one recursion per lambda).

    Returns one ``(advantages, returns)`` pair of [B, T] float32 tensors per lambda (zero on
    padding), each bitwise equal to ``gae(rewards, values, mask, gamma, lam)``.
    """
    if not lams:
        raise ValueError("gae_multi needs at least one lambda")
    with torch.no_grad():
        adv_tm, lay, scratch = _gae_time_major(rewards, values, mask, gamma, lams)
        return [(_advantages_out(a, lay, scratch), _returns_out(a, values, lay, scratch)) for a in adv_tm]


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the masked tokens of each row (Schulman et al.
    2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation").

    delta_t = r_t + gamma V_{t'} - V_t and A_t = delta_t + gamma lam A_{t'}, where t' is the next
    masked-in token of the same row (V = A = 0 past the last one). Masked-out positions are
    skipped, so left/right padding and holes inside a response are handled alike. Returns
    ``(advantages, returns)`` with returns = A + V; both are zero on padding. Vectorized over the
    batch, one step per token position, time-major float32 without gradients; masks without holes
    (the collated batch) take a path with two vector ops per position and no ``where``.
    """
    return gae_multi(rewards, values, mask, gamma, (lam,))[0]


def gae_pair(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam_actor: float,
             lam_critic: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The two GAE passes of a PPO step in one: ``(advantages with lam_actor, returns with lam_critic)``.

    Bitwise equal to ``gae(..., lam_actor)[0]`` and ``gae(..., lam_critic)[1]``, at about the cost
    of one pass. Both [B, T] float32, zero on padding.
    """
    with torch.no_grad():
        lams = (lam_actor,) if lam_actor == lam_critic else (lam_actor, lam_critic)
        adv_tm, lay, scratch = _gae_time_major(rewards, values, mask, gamma, lams)
        return _advantages_out(adv_tm[0], lay, scratch), _returns_out(adv_tm[-1], values, lay, scratch)


def adaptive_kl_coef(kl_coef: float, observed_kl: float, target_kl: float, horizon: int,
                     n_steps: int) -> float:
    """Adaptive KL controller (Ziegler et al. 2019): ``coef * (1 + clip(kl/target - 1, +-0.2) * n/horizon)``.

    ``n_steps`` is the number of samples (responses) the observed KL was measured on.
    """
    if target_kl <= 0 or horizon <= 0:
        raise ValueError(f"target_kl and horizon must be > 0, got {target_kl}, {horizon}")
    err = max(-0.2, min(0.2, observed_kl / target_kl - 1.0))
    return kl_coef * (1.0 + err * n_steps / horizon)
