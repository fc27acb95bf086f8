"""Merge methods as pure tensor functions (torch only; no I/O, no Ray, DeepSpeed or vLLM).

Every function takes float32 tensors of one parameter (or one contiguous chunk of it, for the
element-wise methods) and returns a float32 tensor; the streaming engine (``bai.merge``) reads,
upcasts, calls these and rounds once at write. Notation: theta_i the i-th model's tensor,
w_i its weight, delta_i = theta_i - theta_base its task vector.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor


def linear(xs: Sequence[Tensor], weights: Sequence[float], out: Tensor | None = None) -> Tensor:
    """Weighted sum ``sum_i w_i * theta_i``, accumulated in place in ``out`` (allocated if None).

    mergekit's ``linear`` divides by ``sum_i w_i`` when ``normalize`` is true (its default); our
    recipes require weights summing to 1, so both agree. mergekit computes in the checkpoint dtype
    unless ``dtype: float32`` is set; we always accumulate in float32.
    """
    out = torch.mul(xs[0], weights[0], out=out) if out is not None else xs[0] * weights[0]
    for x, w in zip(xs[1:], weights[1:]):
        out.add_(x, alpha=w)
    return out


def bai(base: Tensor, sfts: Sequence[Tensor], weights: Sequence[float], alpha: float) -> Tensor:
    """Balanced Actor Initialization (BAI paper, eqs. 1-2), for one tensor.

    stage 1: ``M_sft = sum_i w_i * M_sft_i`` (sum_i w_i = 1);
    stage 2: ``M_bai = alpha * M_base + (1 - alpha) * M_sft``. alpha is the weight of the base.
    Equal to mergekit ``linear`` over [base, sft_1..] with weights [alpha, (1-alpha) w_1, ...].
    """
    return linear([base, *sfts], [alpha, *((1.0 - alpha) * w for w in weights)])


def bai_sweep(base: Tensor, sfts: Sequence[Tensor], weights: Sequence[float],
              alphas: Sequence[float]) -> Iterator[Tensor]:
    """Yield ``bai(base, sfts, weights, a)`` for every ``a`` in ``alphas``, computing stage 1 once.

    ``S = sum_i w_i sft_i`` is formed once; each output is ``lerp(S, base, a)`` =
    a * base + (1 - a) * S (torch's lerp is exact at both ends: a = 1 returns the base itself).
    Yielded tensors share one buffer: use each before the next.
    """
    s = linear(sfts, weights)
    out = torch.empty_like(s)
    for a in alphas:
        yield torch.lerp(s, base, a, out=out)


def task_arithmetic(base: Tensor, xs: Sequence[Tensor], weights: Sequence[float], lam: float = 1.0) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023): ``theta_base + lam * sum_i w_i * delta_i``.

    Same as mergekit ``task_arithmetic`` with its defaults (normalize false).
    """
    acc = torch.zeros_like(base)
    for x, w in zip(xs, weights):
        acc.add_(x - base, alpha=w)
    return base + lam * acc


def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """Boolean mask keeping the ``round(density * numel)`` entries of largest magnitude (ties by index)."""
    k = int(round(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.topk(delta.abs().flatten(), k, sorted=False).indices] = True
    return mask.view_as(delta)


def sign_consensus_merge(deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """TIES steps 2-3 on already sparsified task vectors: elect a sign, average the agreeing entries.

    ``gamma = sign(sum_i w_i delta_i)`` (a zero sum counts as +); entry i agrees where
    ``sign(delta_i) == gamma`` (pruned zeros never agree); the result is
    ``sum_i w_i delta_i [agree_i] / sum_i w_i [agree_i]`` (0 where nobody agrees).
    With equal weights this is Yadav et al.'s elect + disjoint mean; with weights it is mergekit's
    ``ties`` (normalize true, consensus "sum").
    """
    weighted = torch.stack([d * w for d, w in zip(deltas, weights)])
    gamma = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = torch.stack([torch.sign(d) == gamma for d in deltas])
    w = torch.tensor(list(weights), dtype=weighted.dtype).view(-1, *([1] * deltas[0].dim()))
    num = (weighted * agree).sum(0)
    den = (w * agree).sum(0)
    return torch.where(den != 0, num / torch.where(den == 0, 1.0, den), 0.0)


def ties(base: Tensor, xs: Sequence[Tensor], weights: Sequence[float], density: float, lam: float = 1.0) -> Tensor:
    """TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

    ``delta_i' = delta_i * top-k mask (k = density * numel)``; then ``sign_consensus_merge``;
    result ``theta_base + lam * merged``. Trimming is per tensor (as mergekit; the paper trims the
    whole flattened task vector). Differs from peft's ``ties`` (unweighted sign, divides by count).
    """
    deltas = [d * magnitude_mask(d, density) for d in (x - base for x in xs)]
    return base + lam * sign_consensus_merge(deltas, weights)


def dare_mask(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE (Yu et al. 2024) drop-and-rescale: keep each entry with probability ``density`` and
    divide the kept ones by ``density``. This is the paper's (and peft's) rescale; mergekit since
    PR #505 instead rescales the kept entries to the original L1 norm.
    """
    keep = torch.rand(delta.shape, generator=generator) < density
    return delta * keep / density


def dare_linear(base: Tensor, xs: Sequence[Tensor], weights: Sequence[float], density: float,
                generators: Sequence[torch.Generator], lam: float = 1.0) -> Tensor:
    """DARE + task arithmetic: ``theta_base + lam * sum_i w_i * dare(delta_i)`` (one generator per model)."""
    acc = torch.zeros_like(base)
    for x, w, g in zip(xs, weights, generators):
        acc.add_(dare_mask(x - base, density, g), alpha=w)
    return base + lam * acc


def dare_ties(base: Tensor, xs: Sequence[Tensor], weights: Sequence[float], density: float,
              generators: Sequence[torch.Generator], lam: float = 1.0) -> Tensor:
    """DARE sparsification followed by the TIES sign consensus:
    ``theta_base + lam * sign_consensus_merge([dare(delta_i)], w)``.
    """
    deltas = [dare_mask(x - base, density, g) for x, g in zip(xs, generators)]
    return base + lam * sign_consensus_merge(deltas, weights)


def slerp(x0: Tensor, x1: Tensor, t: float, *, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical linear interpolation of one whole tensor (Shoemake 1985), ``t = 0`` gives ``x0``.

    With ``u_j = x_j / max(||x_j||, eps)`` (flattened) and ``cos(theta) = <u_0, u_1>``:
    ``sin((1-t) theta) / sin(theta) * x0 + sin(t theta) / sin(theta) * x1``; when
    ``|cos(theta)| > dot_threshold`` (near-parallel) it falls back to ``(1-t) x0 + t x1``.
    Same as mergekit ``slerp`` (which runs it in numpy float32 on the CPU).
    """
    u0 = x0.flatten() / x0.norm().clamp_min(eps)
    u1 = x1.flatten() / x1.norm().clamp_min(eps)
    dot = float(torch.dot(u0, u1).clamp(-1.0, 1.0))
    if abs(dot) > dot_threshold:
        return torch.lerp(x0, x1, t)
    theta = math.acos(dot)
    s = math.sin(theta)
    return x0 * (math.sin((1 - t) * theta) / s) + x1 * (math.sin(t * theta) / s)
