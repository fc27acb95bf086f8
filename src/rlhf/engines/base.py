"""The contracts between the trainer and its engines.

A rollout engine turns prompt token ids into sampled responses with the logprobs of the
sampling distribution, and accepts new weights from the actor after each step. The
transformers-``generate`` engine (CPU default) and the vLLM engine (scale path) both implement
``RolloutEngine``; the trainer and workers only ever see this interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How responses are sampled.

    Logprobs returned by an engine are those of the *processed* distribution the token was
    drawn from: logits / temperature, then top-p / top-k filtering, then log-softmax. The
    trainer recomputes its own logprobs with the same temperature (``temperature`` divides the
    trainer's logits too), so rollout and trainer logprobs are comparable token by token.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0          # 0: disabled
    seed: int | None = None  # per-call seed; None: the engine's own generator state


@dataclass
class Generation:
    """One sampled response.

    ``response_ids`` are the generated tokens up to and including EOS (no padding);
    ``logprobs[i]`` is the sampling logprob of ``response_ids[i]``; ``finished`` is True when
    the response ended with EOS and False when it hit ``max_new_tokens`` (truncated).
    """

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    finished: bool
    meta: dict = field(default_factory=dict)


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new policy weights (Hugging Face parameter names, full unsharded tensors)."""
        ...


class TrainingEngine(Protocol):
    """One data-parallel rank of a trainable model (DeepSpeed now; megatron-core could implement it).

    The workers only call these methods, so a new backend needs no trainer or worker changes.
    """

    module: torch.nn.Module

    def forward(self, *args, **kwargs): ...

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of ``loss`` as given (never rescaled by accumulation steps)."""
        ...

    def step(self) -> dict[str, float]:
        """One micro-batch done; at the accumulation boundary update and return grad_norm and lr."""
        ...

    def train(self, mode: bool = True) -> None: ...

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded parameters and buffers with Hugging Face names (every rank calls it)."""
        ...

    def save_pretrained(self, out_dir) -> None: ...

    def save_state(self, out_dir) -> None:
        """Weights, optimizer and scheduler for exact resume."""
        ...

    def load_state(self, in_dir) -> None: ...

    def destroy(self) -> None: ...
