"""What each Ray worker is built with: one frozen record per role, filled from the config by
``rlhf.workers.group`` and passed to the worker's constructor (picklable: strings, numbers, the
config's own sections).

``TrainableSpec`` (actor, critic; with ``PPOLossSettings``), ``ReferenceSpec``, ``RewardSpec`` and
``RolloutSpec``. The data-parallel rank and world size of a trainable worker travel beside its spec.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.engines.base import EngineArgs


@dataclass(frozen=True)
class PPOLossSettings:
    """The ``ppo`` section's loss settings the actor and critic workers apply."""

    clip_low: float
    """The policy ratio is clipped at 1 - clip_low."""
    clip_high: float
    """The policy ratio is clipped at 1 + clip_high."""
    dual_clip: float | None
    """Dual-clip bound on negative-advantage tokens (> 1), or ``None``: off."""
    value_clip: float
    """Values are clipped within ± value_clip of the old values."""


@dataclass(frozen=True)
class TrainableSpec:
    """One actor or critic rank, less its rank and world size."""

    model_path: str
    """Hugging Face checkpoint the engine is built from."""
    engine: str
    """Training backend, a key of ``rlhf.engines.base.ENGINES`` (``deepspeed`` / ``megatron``)."""
    settings: object
    """The backend's config section (``cfg.deepspeed`` or ``cfg.megatron``)."""
    args: EngineArgs
    """Backend-neutral build arguments (optimizer, micro-batching, temperature)."""
    loss: PPOLossSettings
    """PPO clipping the worker's loss functions use."""
    threads: int = 1
    """torch threads of the worker process."""


@dataclass(frozen=True)
class ReferenceSpec:
    """The frozen reference policy."""

    model_path: str
    """Hugging Face causal-LM checkpoint."""
    temperature: float
    """Divides the logits before logprobs, as the rollout's sampler does."""
    dtype: str = "float32"
    """Weights dtype (a ``torch`` attribute name: ``float32`` / ``bfloat16``)."""
    threads: int = 1
    """torch threads of the worker process."""
    max_tokens_per_micro_batch: int = 0
    """Token budget of one scoring forward (``ppo.max_tokens_per_micro_batch``; 0: the whole batch at once)."""


@dataclass(frozen=True)
class RewardSpec:
    """The frozen reward: a sequence-classification model or a rule-based function (exactly one)."""

    tokenizer_path: str
    """Tokenizer that decodes prompts and responses for the rule-based functions."""
    model_path: str | None
    """Reward model checkpoint (``reward.model``), or ``None``."""
    function: str | None
    """Rule-based ``module:function`` (``reward.function``), or ``None``."""
    metrics: str | None = None
    """Gold-metrics ``module:function`` (``reward.metrics``), or ``None``."""
    dtype: str = "float32"
    """Reward model weights dtype."""
    allow_local_code: bool = False
    """``reward.allow_local_code``: functions may be imported from the run or working directory."""
    run_dir: str | None = None
    """Absolute run directory (searched for local reward modules)."""
    driver_cwd: str | None = None
    """The driver's working directory (searched for local reward modules)."""
    threads: int = 1
    """torch threads of the worker process."""
    max_tokens_per_micro_batch: int = 0
    """Token budget of one scoring forward (``ppo.max_tokens_per_micro_batch``; 0: the whole batch at once)."""


@dataclass(frozen=True)
class RolloutSpec:
    """The rollout worker's engine."""

    engine: str
    """``hf`` (transformers ``generate``) or ``vllm``."""
    model_path: str
    """Initial policy checkpoint."""
    pad_id: int
    """Tokenizer pad id."""
    eos_id: int
    """Tokenizer EOS id."""
    vllm: dict | None = None
    """``VLLMEngineConfig`` overrides for ``engine == "vllm"`` (``group.vllm_overrides``), else ``None``."""
    dtype: str = "float32"
    """Weights dtype."""
    threads: int = 1
    """torch threads of the worker process."""
