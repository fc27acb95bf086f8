"""The typed PPO config tree: YAML -> validated dataclasses, with dotted command-line overrides.

``load_config(path, overrides)`` reads a YAML file, applies ``key.sub=value`` overrides (values
parsed as YAML scalars), and builds ``PPOConfig``. An unknown key, a wrong type, a batch size
that does not divide or a missing path stops with one ``ConfigError`` naming the key, before
any work starts. Every field has a default, so a YAML file only names what it changes.
"""

from __future__ import annotations

from bairlhf.errors import UserError

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bairlhf.typed_config import build
from rlhf.metrics.config import StabilityConfig  # the typed metrics: section (stdlib only, no torch)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "ppo" / "tiny_cpu.yaml"


class ConfigError(UserError):
    """A config value is invalid; the message names the dotted key."""


@dataclass
class TinyModels:
    """Build tiny random models on the spot (tests, demos); used when ``model.actor`` is ``"tiny"``."""

    arch: str = "llama"
    """``llama`` or ``qwen2``."""
    hidden_size: int = 64
    """Hidden width; head_dim = hidden_size / num_heads."""
    num_layers: int = 2
    """Decoder layers."""
    num_heads: int = 2
    """Attention heads."""
    template: str = "prefill"
    """Chat template style of the tiny tokenizer: ``prefill`` (prompt ends with <think>) or ``emit``."""
    seed: int = 0
    """Initialisation seed of the tiny actor."""


@dataclass
class ModelConfig:
    """Where the four roles come from."""

    actor: str = "tiny"
    """Actor init: a Hugging Face checkpoint directory, or ``"tiny"`` (built from ``model.tiny``)."""
    bai_recipe: str | None = None
    """A ``bai merge`` YAML recipe; when set, the merge runs first and its output initialises the actor."""
    reference: str | None = None
    """Frozen reference policy; default: the actor's initial weights."""
    critic: str | None = None
    """Critic init; default: the reward model (as the paper does), else the actor."""
    tokenizer: str | None = None
    """Tokenizer directory; default: the actor's."""
    tiny: TinyModels = field(default_factory=TinyModels)
    """Tiny model settings (``actor: tiny`` only)."""
    allow_pickle: bool = False
    """Allow pickled ``.bin`` weights (safetensors only by default)."""


@dataclass
class RewardConfig:
    """The frozen reward: a sequence-classification model or a rule-based Python function."""

    model: str | None = None
    """Reward model directory (AutoModelForSequenceClassification, one label)."""
    function: str | None = "rlhf.rewards:digit_ratio"
    """Rule-based reward ``module:function(prompts, responses, finished) -> list[float]``."""
    clip: float = 10.0
    """Scores are clipped to [-clip, clip] before KL shaping."""
    normalize: bool = False
    """Whiten scores within each batch."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of truncated responses (no EOS)."""
    metrics: str | None = None
    """Gold metrics logged every step beside the reward, ``module:function(prompts, responses, finished)
    -> dict[str, float]`` on the decoded texts (e.g. ``rlhf.testbed.rewards:gold``: exact accuracy)."""


@dataclass
class DataConfig:
    """Prompts."""

    path: str = "builtin:arith"
    """JSONL or parquet file with a ``prompt`` (string) or ``messages`` (chat list) column; ``builtin:arith`` for the demo."""
    prompt_key: str = "prompt"
    """Column holding the prompt."""
    chat_template: bool = True
    """Apply the tokenizer's chat template with a generation prompt."""
    think_prefill: bool = False
    """Append ``<think>\\n`` after the generation prompt when the template does not already end with it."""
    max_prompt_tokens: int = 128
    """Longer prompts are cut from the left."""
    num_builtin: int = 256
    """Number of ``builtin:arith`` prompts."""


@dataclass
class RolloutConfig:
    """Sampling."""

    engine: str = "hf"
    """``hf`` (transformers generate, CPU default) or ``vllm``."""
    max_new_tokens: int = 16
    """Response length limit."""
    temperature: float = 1.0
    """Sampling temperature (the trainer divides its logits by it too)."""
    top_p: float = 1.0
    """Nucleus sampling."""
    top_k: int = 0
    """Top-k sampling (0: off)."""
    num_engines: int = 1
    """vLLM engines (``engine: vllm``); prompts are split evenly across them. Must be 1 for ``hf``."""
    tensor_parallel_size: int = 1
    """GPUs per vLLM engine (vLLM tensor parallelism; 1 on CPU). Must be 1 for ``hf``."""
    weight_sync: str = "auto"
    """How new actor weights reach the rollout engine after each step: ``reload`` (full tensors
    through Ray's object store, loaded in place: the colocated path), ``broadcast`` (a gloo / NCCL
    broadcast from actor rank 0 to every vLLM worker: engines placed apart, ``engine: vllm`` only),
    or ``auto`` (``broadcast`` for vLLM with ``cluster.colocate: false``, else ``reload``)."""


@dataclass
class PPOSettings:
    """The PPO algorithm."""

    rollout_batch_size: int = 16
    """Prompts per step."""
    n_samples_per_prompt: int = 1
    """Responses per prompt (the paper samples each prompt once)."""
    mini_batch_size: int = 8
    """Sequences per optimizer step (global, all data-parallel ranks)."""
    micro_batch_size: int = 4
    """Sequences per forward/backward on one rank."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    clip_low: float = 0.2
    """Policy ratio clip below 1."""
    clip_high: float = 0.2
    """Policy ratio clip above 1."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 for negative advantages (None: off)."""
    value_clip: float = 0.2
    """Value clip around the old values."""
    gamma: float = 1.0
    """Discount."""
    lam_actor: float = 0.95
    """GAE lambda for the actor's advantages."""
    lam_critic: float = 0.95
    """GAE lambda for the critic's returns (VC-PPO uses 1.0)."""
    kl_coef: float = 0.01
    """Initial KL penalty coefficient in the token reward."""
    kl_kind: str = "k1"
    """KL estimator in the token reward: k1, k2 or k3."""
    kl_target: float | None = None
    """Adaptive KL controller target (None: fixed coefficient)."""
    kl_horizon: int = 10000
    """Adaptive KL horizon."""
    whiten_advantages: bool = True
    """Whiten advantages over all response tokens of the batch."""
    critic_warmup_steps: int = 0
    """Steps at the start where only the critic trains."""
    tis_cap: float | None = None
    """Truncated importance sampling cap on exp(trainer - rollout logprob) (None: off)."""
    old_logp_source: str = "trainer"
    """Where PPO's old-policy logprobs come from: ``trainer`` (the actor rescores every batch, one
    extra forward) or ``rollout`` (the rollout engine's sampling logprobs, as TRL does; the actor's
    scoring forward runs at step 0 only, for the ``kl/rollout_vs_trainer`` check, so
    ``rollout/entropy`` and ``kl/rollout_vs_trainer*`` are logged at step 0 only; ``actor/entropy``
    from the training forwards stays every step). ``rollout`` needs no top-k / top-p filtering
    (the engine's logprobs are then of the filtered distribution) and no ``tis_cap``."""


@dataclass
class OptimConfig:
    """AdamW with warmup-then-constant learning rate, shared shape for actor and critic."""

    actor_lr: float = 1e-6
    """Actor learning rate."""
    critic_lr: float = 1e-6
    """Critic learning rate."""
    warmup_steps: int = 0
    """Linear warmup over this many optimizer steps, then constant."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Gradient-norm clipping."""


@dataclass
class DeepSpeedConfig:
    """Training engine."""

    zero_stage: int = 0
    """ZeRO stage 0-3."""
    bf16: bool = False
    """bf16 mixed precision, CPU or GPU: DeepSpeed keeps bf16 weights and activations with fp32
    master weights and AdamW states; the reference, reward model and rollout engine hold bf16
    weights too (log-probabilities, values, rewards and losses are computed in fp32)."""


@dataclass
class ClusterConfig:
    """Ray placement."""

    actor_workers: int = 1
    """Data-parallel actor ranks."""
    critic_workers: int = 1
    """Data-parallel critic ranks."""
    colocate: bool = True
    """All roles share the same GPUs (bundles) of the placement plan; False: each role on its own
    (actor / critic ranks, one GPU each for reference and reward, ``rollout.num_engines x
    rollout.tensor_parallel_size`` for vLLM)."""
    cpus_per_worker: float = 0.25
    """CPUs each worker reserves (a bundle reserves this times the roles placed on it)."""
    gpus_per_worker: float = 0.0
    """0: a CPU-only run (placement bundles hold CPUs only). > 0: every placement bundle holds one
    GPU and the roles placed on it share it (1 / roles each, ``rlhf.placement``)."""
    address: str | None = None
    """Ray address to join (None: start or reuse a local one)."""
    gpus_per_node: int | None = None
    """GPUs (placement bundles) per node of the placement plan (``rlhf.placement``); None: every
    worker on one node (the local CPU case). 8 on an 8 x 8 cluster."""


@dataclass
class TrainerConfig:
    """The loop."""

    total_steps: int = 30
    """PPO steps."""
    save_every: int = 10
    """Checkpoint every K steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept (oldest removed)."""
    probe_every: int = 0
    """Re-sample the fixed probe prompts every N steps (0: off)."""
    num_probes: int = 4
    """Probe prompts (the first N of the data)."""
    max_restarts: int = 2
    """Restarts from the last checkpoint after a Ray worker dies."""
    rollout_check_tol: float = 1e-3
    """Max kl/rollout_vs_trainer allowed at step 0."""
    threads_per_worker: int = 1
    """torch threads in each worker."""


@dataclass
class PPOConfig:
    """One PPO run."""

    run_dir: str = "runs/ppo"
    """Run directory: resolved config, metrics, TensorBoard, checkpoints."""
    seed: int = 0
    """Seeds data order, sampling and mini-batch shuffles."""
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOSettings = field(default_factory=PPOSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    metrics: StabilityConfig = field(default_factory=StabilityConfig)
    """Length buckets and detector thresholds (``rlhf.metrics.config``), built once here and passed to
    ``batch_metrics``, the stability monitor and ``rlhf report``."""


# ----------------------------------------------------------------------------- building

def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides look like key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return data


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: PPOConfig, check_paths: bool = True) -> PPOConfig:
    """Cross-field checks; raises ``ConfigError`` naming the key."""
    p, c = cfg.ppo, cfg.cluster
    n = p.rollout_batch_size * p.n_samples_per_prompt
    for key, v in [("ppo.rollout_batch_size", p.rollout_batch_size), ("ppo.mini_batch_size", p.mini_batch_size),
                   ("ppo.micro_batch_size", p.micro_batch_size), ("ppo.ppo_epochs", p.ppo_epochs),
                   ("ppo.n_samples_per_prompt", p.n_samples_per_prompt), ("cluster.actor_workers", c.actor_workers),
                   ("cluster.critic_workers", c.critic_workers), ("trainer.total_steps", cfg.trainer.total_steps),
                   ("rollout.max_new_tokens", cfg.rollout.max_new_tokens)]:
        _check(v >= 1, key, f"must be >= 1, got {v}")
    _check(n % p.mini_batch_size == 0, "ppo.mini_batch_size",
           f"{p.mini_batch_size} does not divide the rollout batch of {n} sequences "
           "(rollout_batch_size x n_samples_per_prompt)")
    for key, w in [("cluster.actor_workers", c.actor_workers), ("cluster.critic_workers", c.critic_workers)]:
        _check(p.mini_batch_size % (w * p.micro_batch_size) == 0, "ppo.micro_batch_size",
               f"mini_batch_size {p.mini_batch_size} is not a multiple of micro_batch_size {p.micro_batch_size} "
               f"x {key} {w}")
    _check(p.kl_kind in ("k1", "k2", "k3"), "ppo.kl_kind", f"must be k1, k2 or k3, got {p.kl_kind!r}")
    _check(p.old_logp_source in ("trainer", "rollout"), "ppo.old_logp_source",
           f"must be trainer or rollout, got {p.old_logp_source!r}")
    if p.old_logp_source == "rollout":
        _check(cfg.rollout.top_k == 0 and cfg.rollout.top_p == 1.0, "ppo.old_logp_source",
               "rollout needs rollout.top_k 0 and rollout.top_p 1.0 (the engine's logprobs are of the filtered "
               "distribution, the training forward's are not)")
        _check(p.tis_cap is None, "ppo.old_logp_source",
               "rollout makes ppo.tis_cap a no-op (old and rollout logprobs are the same); set tis_cap null")
    _check(cfg.deepspeed.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3")
    _check(cfg.rollout.engine in ("hf", "vllm"), "rollout.engine", f"must be hf or vllm, got {cfg.rollout.engine!r}")
    r = cfg.rollout
    _check(r.num_engines >= 1, "rollout.num_engines", f"must be >= 1, got {r.num_engines}")
    _check(r.tensor_parallel_size >= 1, "rollout.tensor_parallel_size", f"must be >= 1, got {r.tensor_parallel_size}")
    if r.engine == "hf":
        _check(r.num_engines == 1 and r.tensor_parallel_size == 1, "rollout.num_engines",
               "the hf engine runs one engine without tensor parallelism (num_engines and tensor_parallel_size 1)")
    _check(r.weight_sync in ("auto", "reload", "broadcast"), "rollout.weight_sync",
           f"must be auto, reload or broadcast, got {r.weight_sync!r}")
    _check(r.weight_sync != "broadcast" or r.engine == "vllm", "rollout.weight_sync",
           "broadcast needs rollout.engine: vllm")
    _check(r.tensor_parallel_size == 1 or c.gpus_per_worker > 0, "rollout.tensor_parallel_size",
           "tensor parallelism needs GPUs (cluster.gpus_per_worker > 0)")
    _check(c.gpus_per_node is None or c.gpus_per_node >= 1, "cluster.gpus_per_node", "must be >= 1")
    from rlhf.placement import PlacementError, make_plan, spec_from_ppo_config  # no ray at import

    try:
        make_plan(spec_from_ppo_config(cfg))
    except PlacementError as e:
        raise ConfigError(f"cluster: {e}") from None
    _check(cfg.rollout.temperature > 0, "rollout.temperature", "must be > 0")
    _check(0 < cfg.rollout.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    _check(p.dual_clip is None or p.dual_clip > 1, "ppo.dual_clip", "must be > 1")
    _check(cfg.model.tiny.arch in ("llama", "qwen2"), "model.tiny.arch", "must be llama or qwen2")
    _check((cfg.reward.model is None) != (cfg.reward.function is None), "reward",
           "set exactly one of reward.model and reward.function")
    if cfg.reward.function is not None:
        _check(":" in cfg.reward.function, "reward.function", f"expected module:function, got {cfg.reward.function!r}")
    if check_paths:
        paths = [("model.reference", cfg.model.reference), ("model.critic", cfg.model.critic),
                 ("model.tokenizer", cfg.model.tokenizer), ("model.bai_recipe", cfg.model.bai_recipe),
                 ("reward.model", cfg.reward.model)]
        if cfg.model.actor != "tiny" and cfg.model.bai_recipe is None:
            paths.append(("model.actor", cfg.model.actor))
        if not cfg.data.path.startswith("builtin:"):
            paths.append(("data.path", cfg.data.path))
        for key, path in paths:
            _check(path is None or Path(path).exists(), key, f"path does not exist: {path}")
    return cfg


def weight_sync_mode(cfg: PPOConfig) -> str:
    """``rollout.weight_sync`` with ``auto`` resolved: ``broadcast`` or ``reload``."""
    if cfg.rollout.weight_sync != "auto":
        return cfg.rollout.weight_sync
    return "broadcast" if cfg.rollout.engine == "vllm" and not cfg.cluster.colocate else "reload"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                check_paths: bool = True) -> PPOConfig:
    """Read YAML (default: the tiny CPU config), apply dotted overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.exists():
        raise ConfigError(f"config: file does not exist: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping")
    apply_overrides(data, list(overrides or []))
    return validate(build(PPOConfig, data, "", ConfigError), check_paths=check_paths)


def to_dict(cfg: PPOConfig) -> dict:
    """Plain nested dict (tuples as lists), ready for YAML."""
    def conv(x):
        if isinstance(x, tuple):
            return [conv(v) for v in x]
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x
    return conv(dataclasses.asdict(cfg))


def save_config(cfg: PPOConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
