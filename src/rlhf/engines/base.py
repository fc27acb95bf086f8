"""The contracts between the trainer and its engines.

A rollout engine turns prompt token ids into sampled responses with the logprobs of the
sampling distribution, and accepts new weights from the actor after each step. The
transformers-``generate`` engine (CPU default) and the vLLM engine (scale path) both implement
``RolloutEngine``; the trainer and workers only ever see this interface.

A training engine (``TrainingEngine``) is one rank of a trainable actor or critic built from a
Hugging Face checkpoint: per-token logprobs / entropy or values, ``forward_backward`` with its own
micro-batching, the optimizer step, ``export_weights`` in Hugging Face names. ``ENGINES`` maps the
config's ``engine.actor`` / ``engine.critic`` to the implementations (DeepSpeed, megatron-core):
adding a backend is one module implementing ``TrainingEngine`` plus one line there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Protocol

import torch

if TYPE_CHECKING:  # the batch records are built from ``Generation`` below
    from rlhf.workers.batch import RolloutBatch, ScoredBatch


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


@dataclass(frozen=True)
class EngineArgs:
    """What every training backend is built with (the backend's own section, ``deepspeed`` or
    ``megatron``, comes beside it as ``settings``)."""

    lr: float
    """Peak learning rate (> 0); linear warm-up over ``warmup_steps`` optimizer steps, then constant."""
    warmup_steps: int = 0
    """Warm-up optimizer steps (>= 0)."""
    weight_decay: float = 0.0
    """AdamW weight decay (>= 0)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas, each in [0, 1)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (> 0)."""
    micro_batch_size: int = 1
    """Rows per forward in ``forward_backward`` (>= 1)."""
    max_tokens_per_micro_batch: int = 0
    """Token budget of one micro-batch (0: off, ``micro_batch_size`` rows padded to the batch): rows
    sorted by length and grouped while rows x (longest prompt + longest response) fits, each group
    trimmed of its all-padding columns (``rlhf.workers.batch.token_budget_micro_batches``)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on one data-parallel rank (>= 1; DeepSpeed's accumulation
    boundary; megatron accumulates whatever one ``forward_backward`` call holds)."""
    seed: int = 0
    """Seeds a missing critic head (and megatron's RNG tracker)."""
    temperature: float = 1.0
    """Divides the policy's logits before logprobs / entropy (> 0), as the rollout's sampler does."""


class TrainingEngine(Protocol):
    """One rank of a trainable model: the only thing the actor and critic workers call.

    Built by ``from_pretrained(model_dir, role, settings, args)`` from a Hugging Face checkpoint;
    ``role`` is ``policy`` (causal LM) or ``critic`` (a ``score`` head read per token, saved as
    ``AutoModelForSequenceClassification(num_labels=1)``). Batches are the workers' records
    (``rlhf.workers.batch``: a ``RolloutBatch`` to score, a ``ScoredBatch`` to train on; ``input_ids`` /
    ``attention_mask`` / ``position_ids`` ``[B, P+T]``, left-padded prompts and right-padded responses,
    ``responses`` / ``mask`` ``[B, T]``, ``prompt_len``). Outputs are
    per response token, float32, ``[B, T]``: ``logp`` and ``entropy`` (policy) or ``values`` (critic);
    their values where ``mask == 0`` are unspecified. Implementations: ``deepspeed`` and ``megatron``
    (``ENGINES``); a new backend is one module plus one line there.
    """

    rank: int
    world_size: int
    dp_rank: int
    """Data-parallel rank: ranks with the same ``dp_rank`` (one model-parallel group) get the same rows."""
    dp_size: int
    """Data-parallel size (the ``dp_world_size`` the losses are normalised with)."""

    @classmethod
    def from_pretrained(cls, model_dir, role: str, settings, args: EngineArgs) -> "TrainingEngine": ...

    def forward(self, batch: RolloutBatch) -> dict[str, torch.Tensor]:
        """No-grad per-token outputs of ``batch`` on the CPU, on every rank (collective for model parallelism)."""
        ...

    def forward_backward(self, batch: ScoredBatch, loss_fn) -> list[dict[str, float]]:
        """Accumulate gradients of ``loss_fn(outputs, sub_batch) -> (loss, stats)`` over the engine's own
        micro-batches of ``batch`` (``sub_batch``: ``batch.select_rows(...)``, same class) (outputs as ``forward`` gives them, with grad; the loss is used as
        given, never rescaled). Returns one record per micro-batch: stats as floats plus ``loss``.
        Raises ``FloatingPointError`` on a non-finite loss."""
        ...

    def step(self) -> dict[str, float]:
        """The optimizer and LR-schedule step after ``forward_backward``: ``{grad_norm, lr}``."""
        ...

    def export_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        """(Hugging Face name, full CPU tensor), one at a time (collective: every rank consumes it);
        what weight sync and checkpoints use."""
        ...

    def save_pretrained(self, out_dir) -> None:
        """An ordinary Hugging Face checkpoint directory (collective; rank 0 writes)."""
        ...

    def save_state(self, out_dir) -> None:
        """Weights, optimizer and scheduler for an exact resume (no pickle code on load)."""
        ...

    def load_state(self, in_dir) -> None: ...

    def destroy(self) -> None: ...


ENGINES = {
    "deepspeed": "rlhf.engines.deepspeed_engine:DeepSpeedTrainEngine",
    "megatron": "rlhf.engines.megatron.engine:MegatronEngine",
}
"""Training backends by the name ``engine.actor`` / ``engine.critic`` selects (``module:class``, imported
when chosen, so a backend's packages load only in the workers that use it)."""


def engine_class(name: str):
    """The ``TrainingEngine`` class registered as ``name`` in ``ENGINES``."""
    import importlib

    if name not in ENGINES:
        raise ValueError(f"training engine: {name!r} is not one of {', '.join(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)
