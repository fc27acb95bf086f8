"""Masked statistics over response-aligned tensors.

Every tensor is ``[B, T]`` (T = longest response of the batch) and ``mask`` is 1.0 on response
tokens (including EOS) and 0.0 on padding, wherever the padding sits. Values under a zero mask
never reach a result, even when they are NaN or inf (logprobs of pad tokens often are).
"""

from __future__ import annotations

import torch


def _check_same_shape(x: torch.Tensor, mask: torch.Tensor, name: str = "x") -> None:
    if x.shape != mask.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but mask has shape {tuple(mask.shape)}")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over positions where ``mask`` is non-zero (weighted by ``mask``)."""
    _check_same_shape(x, mask)
    m = mask.to(x.dtype) if x.is_floating_point() else mask.float()
    vals = torch.where(mask != 0, x * m, torch.zeros((), dtype=m.dtype, device=x.device))
    return vals.sum() if dim is None else vals.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over masked positions; 0 where the mask is empty (no NaN)."""
    total = masked_sum(x, mask, dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.to(total.dtype).clamp_min(1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all masked positions (Bessel-corrected when ``unbiased``).

    Returns 0 when fewer than two tokens are masked in (the unbiased estimate is undefined).
    """
    mean = masked_mean(x, mask)
    centered = torch.where(mask != 0, x - mean, torch.zeros((), dtype=mean.dtype, device=x.device))
    var = masked_mean(centered.pow(2), mask)
    n = mask.sum().to(var.dtype)
    if unbiased:
        var = torch.where(n > 1, var * n / (n - 1).clamp_min(1.0), torch.zeros_like(var))
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked tokens of the whole batch.

    ``mean`` and the Bessel-corrected ``var`` are ``masked_mean`` / ``masked_var`` (weighted by
    ``mask``), computed here in fewer passes over the batch: one masked copy that is centred and
    scaled in place into the result, and the weight multiplications skipped for a 0/1 mask
    (multiplying by 1 is exact). With ``shift_mean=False`` the mean is added back (scale only).
    Padding positions are 0.
    """
    _check_same_shape(x, mask)
    return _masked_whiten(x, mask, mask != 0, shift_mean, eps)


def _masked_whiten(x, mask, on, shift_mean, eps, scratch=None):
    """``masked_whiten`` with the boolean mask given; ``scratch`` (optional, x's shape, float32,
    sharing no memory with x) receives the squared deviations instead of a new buffer."""
    off = ~on
    m = mask.to(x.dtype) if x.is_floating_point() else mask.float()
    binary = mask.dtype == torch.bool or bool((mask == 1).logical_or_(off).all())
    count = m.sum()
    n = count.clamp_min(1.0)
    zero = torch.zeros((), dtype=m.dtype, device=x.device)
    centered = torch.where(on, x, zero)                    # x on tokens, 0 on padding (NaN dropped)
    if binary:
        mean = centered.sum() / n
    else:
        mean = (centered * m).sum() / n
    centered.sub_(mean).masked_fill_(off, 0.0)
    sq = centered * centered if scratch is None else torch.mul(centered, centered, out=scratch)
    if not binary:
        sq.mul_(m)
    var = sq.sum() / n
    del sq
    var = torch.where(count > 1, var * count / (count - 1).clamp_min(1.0), torch.zeros_like(var))
    out = centered.mul_(torch.rsqrt(var + eps))
    if not shift_mean:
        out = out.add_(mean).masked_fill_(off, 0.0)
    return out
