"""Per-token KL estimators, log-probabilities and entropy from logits.

KL estimators (Schulman, "Approximating KL divergence"): for tokens sampled from the policy
pi and log-ratio ``x = logp - ref_logp``,

    k1 = x                    unbiased for KL(pi || ref), high variance, can be negative
    k2 = x^2 / 2              biased (second-order match), low variance, >= 0
    k3 = exp(-x) - 1 + x      unbiased for KL(pi || ref), low variance, >= 0

Numerical guards: k3 clamps ``x`` to [-20, 20] before the exponential (exp(20) ~ 5e8 stays
finite in fp16/bf16-upcast fp32) and uses ``expm1`` so tiny log-ratios keep their precision.
k1 and k2 are exact (no clamping). Inputs are upcast to float32 when they are half precision.
"""

from __future__ import annotations

import torch

KL_KINDS = ("k1", "k2", "k3")
K3_LOGRATIO_CLAMP = 20.0


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL estimate of KL(pi || ref) for tokens sampled from pi; shape of ``logp``."""
    if kind not in KL_KINDS:
        raise ValueError(f"kl kind must be one of {KL_KINDS}, got {kind!r}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ in shape")
    return kl_from_log_ratio(_float(logp) - _float(ref_logp), kind)


def kl_from_log_ratio(x: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """The estimator ``kind`` of a log-ratio ``x = logp - ref_logp`` (same guards as ``kl_penalty``)."""
    if kind not in KL_KINDS:
        raise ValueError(f"kl kind must be one of {KL_KINDS}, got {kind!r}")
    x = _float(x)
    if kind == "k1":
        return x
    if kind == "k2":
        return 0.5 * x * x
    x = x.clamp(-K3_LOGRATIO_CLAMP, K3_LOGRATIO_CLAMP)
    return torch.expm1(-x) + x


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of ``labels`` [B, T] under softmax(logits / temperature), logits [B, T, V].

    Computed in float32 as ``logit[label] - logsumexp(logits)`` (no full log-softmax copy).
    ``temperature`` must equal the sampler's so trainer and rollout logprobs are comparable.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the full categorical distribution softmax(logits) per position: [B, T, V] -> [B, T]."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return lse - (probs * logits).sum(-1)
