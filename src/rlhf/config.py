"""The typed PPO config tree: YAML -> validated dataclasses, with dotted command-line overrides.

``load_config(path, overrides)`` reads a YAML file (``bairlhf.yamlio``: a syntax error names
file:line:col), applies ``key.sub=value`` overrides (values parsed as YAML; a bad value names
its key), and builds ``PPOConfig`` with ``bairlhf.typed_config.build``. Every numeric field's
valid range and every enum's choices are part of its type (``Annotated[float, Range(...)]``,
``Literal[...]``), so they are checked at load and listed by ``field_ranges(PPOConfig)``
(``docs/config_ranges.md``). An unknown key, a wrong type, a value out of range, a batch size
that does not divide, a missing path or a malformed prompts file (``rlhf.data.check_prompts``)
stops with one ``ConfigError`` naming the key (or file:line), before any work starts: loading
only reads files, it writes nothing. Every field has a default, so a YAML file only names what
it changes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import yaml

from bairlhf.errors import UserError
from bairlhf.typed_config import Range, build
from bairlhf.yamlio import load_mapping, parse_value
from rlhf.plan import PlanSettings
from rlhf.metrics.config import StabilityConfig  # the typed metrics: section (stdlib only, no torch)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "ppo" / "tiny_cpu.yaml"

# Shorthands for the ranges used below (closed bounds unless ``_open``).
POS = Range(0, None, lo_open=True)       # > 0
NONNEG = Range(0, None)                  # >= 0
ONE_UP = Range(1, None)                  # >= 1
UNIT = Range(0, 1)                       # [0, 1]


class ConfigError(UserError):
    """A config value is invalid; the message names the dotted key."""


@dataclass
class TinyModels:
    """Build tiny random models on the spot (tests, demos); used when ``model.actor`` is ``"tiny"``."""

    arch: Literal["llama", "qwen2"] = "llama"
    """``llama`` or ``qwen2``."""
    hidden_size: Annotated[int, ONE_UP] = 64
    """Hidden width (>= 1); head_dim = hidden_size / num_heads."""
    num_layers: Annotated[int, ONE_UP] = 2
    """Decoder layers (>= 1)."""
    num_heads: Annotated[int, ONE_UP] = 2
    """Attention heads (>= 1, divides hidden_size)."""
    template: Literal["prefill", "emit"] = "prefill"
    """Chat template style of the tiny tokenizer: ``prefill`` (prompt ends with <think>) or ``emit``."""
    seed: Annotated[int, NONNEG] = 0
    """Initialisation seed of the tiny actor (>= 0)."""


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
    clip: Annotated[float, POS] = 10.0
    """Scores are clipped to [-clip, clip] before KL shaping (> 0)."""
    normalize: bool = False
    """Whiten scores within each batch."""
    missing_eos_penalty: Annotated[float, NONNEG] = 0.0
    """Subtracted from the score of truncated responses (no EOS); >= 0."""
    metrics: str | None = None
    """Gold metrics logged every step beside the reward, ``module:function(prompts, responses, finished)
    -> dict[str, float]`` on the decoded texts (e.g. ``rlhf.testbed.rewards:gold``: exact accuracy)."""
    allow_local_code: bool = False
    """Let ``function`` / ``metrics`` import modules from the current directory or the run directory.
    Off (default): only installed modules (site-packages, editable installs, ``PYTHONPATH``) load."""


@dataclass
class DataConfig:
    """Prompts."""

    path: str = "builtin:arith"
    """JSONL or parquet file with a ``prompt`` (string) or ``messages`` (chat list) column; ``builtin:arith``
    for the demo (``rlhf.data.BUILTINS`` lists the built-in sets)."""
    prompt_key: str = "prompt"
    """Column holding the prompt."""
    chat_template: bool = True
    """Apply the tokenizer's chat template with a generation prompt."""
    think_prefill: bool = False
    """Append ``<think>\\n`` after the generation prompt when the template does not already end with it."""
    max_prompt_tokens: Annotated[int, ONE_UP] = 128
    """Longer prompts are cut from the left (>= 1)."""
    num_builtin: Annotated[int, ONE_UP] = 256
    """Number of ``builtin:arith`` prompts (>= 1)."""


@dataclass
class RolloutConfig:
    """Sampling."""

    engine: Literal["hf", "vllm"] = "hf"
    """``hf`` (transformers generate, CPU default) or ``vllm``."""
    max_new_tokens: Annotated[int, ONE_UP] = 16
    """Response length limit (>= 1)."""
    temperature: Annotated[float, POS] = 1.0
    """Sampling temperature (> 0; the trainer divides its logits by it too)."""
    top_p: Annotated[float, Range(0, 1, lo_open=True)] = 1.0
    """Nucleus sampling, in (0, 1] (1: off)."""
    top_k: Annotated[int, NONNEG] = 0
    """Top-k sampling, >= 0 (0: off)."""
    num_engines: Annotated[int, ONE_UP] = 1
    """vLLM engines (``engine: vllm``, >= 1); prompts are split evenly across them. Must be 1 for ``hf``."""
    tensor_parallel_size: Annotated[int, ONE_UP] = 1
    """GPUs per vLLM engine (vLLM tensor parallelism, >= 1; 1 on CPU). Must be 1 for ``hf``."""
    weight_sync: Literal["auto", "reload", "broadcast"] = "auto"
    """How new actor weights reach the rollout engine after each step: ``reload`` (full tensors
    through Ray's object store, loaded in place: the colocated path), ``broadcast`` (a gloo / NCCL
    broadcast from actor rank 0 to every vLLM worker: engines placed apart, ``engine: vllm`` only),
    or ``auto`` (``broadcast`` for vLLM with ``cluster.colocate: false``, else ``reload``)."""


@dataclass
class PPOSettings:
    """The PPO algorithm."""

    rollout_batch_size: Annotated[int, ONE_UP] = 16
    """Prompts per step (>= 1)."""
    n_samples_per_prompt: Annotated[int, ONE_UP] = 1
    """Responses per prompt (>= 1; the paper samples each prompt once)."""
    mini_batch_size: Annotated[int, ONE_UP] = 8
    """Sequences per optimizer step (global, all data-parallel ranks; >= 1, divides the rollout batch)."""
    micro_batch_size: Annotated[int, ONE_UP] = 4
    """Sequences per forward/backward on one rank (>= 1), padded to the batch's longest prompt
    and response (unless ``max_tokens_per_micro_batch`` is set)."""
    max_tokens_per_micro_batch: Annotated[int, ONE_UP] | None = None
    """Padding-free micro-batching (None: off): every forward (scoring: actor, critic, reference,
    reward model; and the PPO updates) runs on groups of rows sorted by length whose padded size,
    rows x (longest prompt + longest response) of the group, stays within this many tokens, each
    trimmed of its all-padding columns; ``micro_batch_size`` is then not used. The losses stay
    normalised by the global token count, so the gradients equal the padded path's. A row longer
    than the budget is a micro-batch of its own. DeepSpeed engine only."""
    ppo_epochs: Annotated[int, ONE_UP] = 1
    """Passes over each rollout batch (>= 1)."""
    clip_low: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] = 0.2
    """Policy ratio clip below 1, in (0, 1): the ratio is clipped at 1 - clip_low."""
    clip_high: Annotated[float, POS] = 0.2
    """Policy ratio clip above 1 (> 0): the ratio is clipped at 1 + clip_high."""
    dual_clip: Annotated[float, Range(1, None, lo_open=True)] | None = None
    """Dual-clip constant c > 1 for negative advantages (None: off)."""
    value_clip: Annotated[float, POS] = 0.2
    """Value clip around the old values (> 0)."""
    gamma: Annotated[float, UNIT] = 1.0
    """Discount, in [0, 1]."""
    lam_actor: Annotated[float, UNIT] = 0.95
    """GAE lambda for the actor's advantages, in [0, 1]."""
    lam_critic: Annotated[float, UNIT] = 0.95
    """GAE lambda for the critic's returns, in [0, 1] (VC-PPO uses 1.0)."""
    kl_coef: Annotated[float, NONNEG] = 0.01
    """Initial KL penalty coefficient in the token reward (>= 0; 0: no KL penalty)."""
    kl_kind: Literal["k1", "k2", "k3"] = "k1"
    """KL estimator in the token reward: k1, k2 or k3."""
    kl_target: Annotated[float, POS] | None = None
    """Adaptive KL controller target (> 0; None: fixed coefficient)."""
    kl_horizon: Annotated[int, ONE_UP] = 10000
    """Adaptive KL horizon (>= 1)."""
    whiten_advantages: bool = True
    """Whiten advantages over all response tokens of the batch (``gae`` only: the critic-free
    estimators fix their own scale)."""
    advantage_estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"] = "gae"
    """Advantage estimator, a key of ``rlhf.algo.estimators.ESTIMATORS``: ``gae`` (PPO with a
    critic), or critic-free ``grpo``, ``dr_grpo``, ``rloo`` (groups of ``n_samples_per_prompt``
    >= 2 responses per prompt) or ``reinforce_pp``. Without a critic none is spawned, trained or
    checkpointed."""
    grpo_eps: Annotated[float, POS] = 1e-6
    """Added to the group reward std of ``grpo`` (> 0)."""
    critic_warmup_steps: Annotated[int, NONNEG] = 0
    """Steps at the start where only the critic trains (>= 0)."""
    tis_cap: Annotated[float, POS] | None = None
    """Truncated importance sampling cap on exp(trainer - rollout logprob) (> 0; None: off)."""
    mismatch_reject: Annotated[float, POS] | None = None
    """Masked importance sampling: a sequence whose token-mean k3 between rollout and trainer
    logprobs (its own ``kl/rollout_vs_trainer``) exceeds this value gets no policy gradient
    (> 0; None: off). Logged as ``kl/rollout_vs_trainer_rejected_frac``. Needs ``old_logp_source:
    trainer``."""
    mismatch_sample_rows: Annotated[int, NONNEG] = 8
    """With ``old_logp_source: rollout``: rows the actor rescores every step for the
    ``kl/rollout_vs_trainer*`` metrics (>= 0; 0: step 0 only; all rows at step 0)."""
    old_logp_source: Literal["trainer", "rollout"] = "trainer"
    """Where PPO's old-policy logprobs come from: ``trainer`` (the actor rescores every batch, one
    extra forward) or ``rollout`` (the rollout engine's sampling logprobs, as TRL does; the actor's
    scoring forward runs on every row at step 0, for the ``kl/rollout_vs_trainer`` check, and on
    ``mismatch_sample_rows`` rows later, so ``rollout/entropy`` and ``kl/rollout_vs_trainer*``
    are logged every step from that subset; ``actor/entropy`` from the training
    forwards stays every step). ``rollout`` needs no top-k / top-p filtering
    (the engine's logprobs are then of the filtered distribution) and no ``tis_cap``."""
    async_rollout: bool = False
    """One-step overlap (``rlhf.workers.async_rollout``): step t+1's batch is generated by the weights
    of step t while step t scores and trains (step 0 generates first, synchronously), so each batch
    after the first is one actor update stale; logged as ``rollout/staleness``. The trainer's
    rescoring is the PPO ratio's old policy and the rollout logprobs the behaviour policy, corrected
    by truncated importance weights: needs ``old_logp_source: trainer`` and ``tis_cap`` set (2.0 is
    usual). A checkpoint stores the batch generated ahead, so resume stays exact. Off by default."""


LR = Range(0, 1, lo_open=True)
"""A learning rate: in (0, 1]."""
BETA = Annotated[float, Range(0, 1, hi_open=True)]
"""An AdamW beta: in [0, 1)."""


@dataclass
class OptimConfig:
    """AdamW with warmup-then-constant learning rate, shared shape for actor and critic."""

    actor_lr: Annotated[float, LR] = 1e-6
    """Actor learning rate, in (0, 1]."""
    critic_lr: Annotated[float, LR] = 1e-6
    """Critic learning rate, in (0, 1]."""
    warmup_steps: Annotated[int, NONNEG] = 0
    """Linear warmup over this many optimizer steps (>= 0), then constant."""
    weight_decay: Annotated[float, NONNEG] = 0.0
    """AdamW weight decay (>= 0)."""
    betas: tuple[BETA, BETA] = (0.9, 0.95)
    """AdamW betas, each in [0, 1)."""
    grad_clip: Annotated[float, NONNEG] = 1.0
    """Gradient-norm clipping (>= 0; 0: off)."""


@dataclass
class DeepSpeedConfig:
    """DeepSpeed training engine (roles whose ``engine`` is ``deepspeed``)."""

    zero_stage: Annotated[int, Range(0, 3)] = 0
    """ZeRO stage, 0-3."""
    bf16: bool = False
    """bf16 mixed precision, CPU or GPU: DeepSpeed keeps bf16 weights and activations with fp32
    master weights and AdamW states; the reference, reward model and rollout engine hold bf16
    weights too (log-probabilities, values, rewards and losses are computed in fp32)."""


@dataclass
class EngineChoice:
    """Training engine per role."""

    actor: Literal["deepspeed", "megatron"] = "deepspeed"
    """Engine of the actor: ``deepspeed`` (ZeRO, section ``deepspeed``) or ``megatron`` (megatron-core
    TP / PP / DP, section ``megatron``)."""
    critic: Literal["deepspeed", "megatron"] = "deepspeed"
    """Engine of the critic: ``deepspeed`` or ``megatron``."""


@dataclass
class MegatronConfig:
    """megatron-core engine settings (used by roles whose engine is ``megatron``)."""

    tensor_parallel: Annotated[int, Range(1, None)] = 1
    """Tensor-parallel size (>= 1); tensor_parallel x pipeline_parallel divides the role's ranks
    (the rest is data parallelism). Heads divisible by it is checked by the engine."""
    pipeline_parallel: Annotated[int, Range(1, None)] = 1
    """Pipeline-parallel size (>= 1)."""
    distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks."""
    recompute: bool = False
    """Full activation recomputation."""
    bf16: bool = False
    """bf16 weights with fp32 master weights and fp32 logprobs."""


@dataclass
class ClusterConfig:
    """Ray placement."""

    actor_workers: Annotated[int, ONE_UP] = 1
    """Actor ranks (>= 1): data-parallel ranks for DeepSpeed; tensor x pipeline x data ranks for megatron."""
    critic_workers: Annotated[int, ONE_UP] = 1
    """Critic ranks (>= 1), as ``actor_workers``."""
    colocate: bool = True
    """All roles share the same GPUs (bundles) of the placement plan; False: each role on its own
    (actor / critic ranks, one GPU each for reference and reward, ``rollout.num_engines x
    rollout.tensor_parallel_size`` for vLLM)."""
    cpus_per_worker: Annotated[float, NONNEG] = 0.25
    """CPUs each worker reserves (>= 0; a bundle reserves this times the roles placed on it)."""
    gpus_per_worker: Annotated[float, NONNEG] = 0.0
    """>= 0. 0: a CPU-only run (placement bundles hold CPUs only). > 0: every placement bundle holds one
    GPU and the roles placed on it share it (1 / roles each, ``rlhf.placement``)."""
    address: str | None = None
    """Ray address to join (None: start or reuse a local one)."""
    gpus_per_node: Annotated[int, ONE_UP] | None = None
    """GPUs (placement bundles) per node of the placement plan (``rlhf.placement``, >= 1); None: every
    worker on one node (the local CPU case). 8 on an 8 x 8 cluster."""


@dataclass
class TrainerConfig:
    """The loop."""

    total_steps: Annotated[int, ONE_UP] = 30
    """PPO steps (>= 1)."""
    save_every: Annotated[int, NONNEG] = 10
    """Checkpoint every K steps (>= 0; 0: only at the end)."""
    keep_checkpoints: Annotated[int, ONE_UP] = 2
    """Checkpoints kept (>= 1; oldest removed)."""
    probe_every: Annotated[int, NONNEG] = 0
    """Re-sample the fixed probe prompts every N steps (>= 0; 0: off)."""
    num_probes: Annotated[int, ONE_UP] = 4
    """Probe prompts (>= 1; the first N of the data)."""
    max_restarts: Annotated[int, NONNEG] = 2
    """Restarts from the last checkpoint after a Ray worker dies (>= 0)."""
    rollout_check_tol: Annotated[float, POS] | None = None
    """Max kl/rollout_vs_trainer allowed at step 0 (> 0). None: 1e-3, except 1e-2 for vLLM
    rollouts in bf16 (vLLM's own bf16 kernels leave an irreducible 1.2-3e-3 on a real model, even
    against an fp32 trainer, see docs/precision.md; a missed weight sync gives ~0.5)."""
    threads_per_worker: Annotated[int, ONE_UP] = 1
    """torch threads in each worker (>= 1)."""
    peak_tflops: Annotated[float, POS] | None = None
    """The whole job's peak (TFLOP/s, > 0) that ``perf/mfu*`` divide by (``rlhf.metrics.perf``); None:
    a matmul probe at start on a CPU run, the GPUs' data-sheet bf16 peak on a GPU run (none, so no
    MFU, when the driver sees no GPU: set it, e.g. 64 x 989 for 8 nodes of 8 H100)."""
    loggers: list[Literal["jsonl", "tensorboard", "wandb"]] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    """Where metrics go (``rlhf.metrics.logger``): ``jsonl`` (``metrics.jsonl``, required: resume, the
    detectors and ``rlhf report`` read it), ``tensorboard`` (``tensorboard/``) and ``wandb`` (``wandb/``,
    offline unless ``WANDB_MODE`` says otherwise; needs the ``wandb`` package); each at most once."""


@dataclass
class PPOConfig:
    """One PPO run."""

    run_dir: str = "runs/ppo"
    """Run directory: resolved config, metrics, TensorBoard, checkpoints."""
    seed: Annotated[int, NONNEG] = 0
    """Seeds data order, sampling and mini-batch shuffles (>= 0)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOSettings = field(default_factory=PPOSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineChoice = field(default_factory=EngineChoice)
    """Training engine per role (``deepspeed`` or ``megatron``)."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    """megatron-core settings (roles whose ``engine`` is ``megatron``)."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    metrics: StabilityConfig = field(default_factory=StabilityConfig)
    """Length buckets and detector thresholds (``rlhf.metrics.config``), built once here and passed to
    ``batch_metrics``, the stability monitor and ``rlhf report``."""
    plan: PlanSettings = field(default_factory=PlanSettings)
    """Hardware and model-size hints for ``rlhf plan`` on this config (the trainer ignores them)."""


# ----------------------------------------------------------------------------- building

def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings (values parsed as YAML, errors naming the key) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"{key}: not a dotted key (overrides look like key.sub=value)")
        node = data
        for i, p in enumerate(parts[:-1]):
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(parts[:i + 1])}: is not a section, cannot set {key}")
        try:
            node[parts[-1]] = parse_value(raw, key)
        except UserError as e:
            raise ConfigError(str(e)) from None
    return data


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def role_parallel(cfg: PPOConfig, role: str) -> tuple[int, int, int]:
    """(tensor, pipeline, data) parallel sizes of a training role (``actor`` or ``critic``):
    DeepSpeed roles are pure data parallel; megatron roles split their ranks into TP x PP x DP."""
    ranks = cfg.cluster.actor_workers if role == "actor" else cfg.cluster.critic_workers
    if getattr(cfg.engine, role) != "megatron":
        return 1, 1, ranks
    tp, pp = cfg.megatron.tensor_parallel, cfg.megatron.pipeline_parallel
    return tp, pp, max(ranks // (tp * pp), 1)


def validate(cfg: PPOConfig, check_paths: bool = True) -> PPOConfig:
    """Cross-field checks (single-field ranges and choices are checked by the typed builder);
    raises ``ConfigError`` naming the key. ``check_paths``: also check that input paths exist
    and that the prompts file parses (``rlhf.data.check_prompts``); reads only."""
    p, c = cfg.ppo, cfg.cluster
    n = p.rollout_batch_size * p.n_samples_per_prompt
    _check(n % p.mini_batch_size == 0, "ppo.mini_batch_size",
           f"{p.mini_batch_size} does not divide the rollout batch of {n} sequences "
           "(rollout_batch_size x n_samples_per_prompt)")
    if p.advantage_estimator != "gae":  # the registry imports torch; the default path stays torch-free
        from rlhf.algo.estimators import get_estimator

        est = get_estimator(p.advantage_estimator)
        _check(not est.needs_groups or p.n_samples_per_prompt >= 2, "ppo.n_samples_per_prompt",
               f"is {p.n_samples_per_prompt}; ppo.advantage_estimator {est.name} compares responses to the "
               "same prompt and needs >= 2")
        _check(est.needs_critic or p.critic_warmup_steps == 0, "ppo.critic_warmup_steps",
               f"must be 0: ppo.advantage_estimator {est.name} trains no critic (model.critic is ignored)")
    m = cfg.megatron
    for role, key in [("actor", "cluster.actor_workers"), ("critic", "cluster.critic_workers")]:
        ranks = getattr(c, role + "_workers")
        if getattr(cfg.engine, role) == "megatron":
            _check(ranks % (m.tensor_parallel * m.pipeline_parallel) == 0, "megatron.tensor_parallel",
                   f"tensor_parallel {m.tensor_parallel} x pipeline_parallel {m.pipeline_parallel} does not divide "
                   f"{key} {ranks} (engine.{role}: megatron)")
        _, _, dp = role_parallel(cfg, role)
        what = f"{key} {ranks}" if dp == ranks else f"{dp} data-parallel {role} ranks"
        _check(p.mini_batch_size % (dp * p.micro_batch_size) == 0, "ppo.micro_batch_size",
               f"mini_batch_size {p.mini_batch_size} is not a multiple of micro_batch_size {p.micro_batch_size} "
               f"x {what}")
    _check(p.max_tokens_per_micro_batch is None or "megatron" not in (cfg.engine.actor, cfg.engine.critic),
           "ppo.max_tokens_per_micro_batch", "is not supported by the megatron engine (its pipeline schedule "
           "runs micro-batches of one shape): set it null or use engine.actor/critic: deepspeed")
    if p.old_logp_source == "rollout":
        _check(cfg.rollout.top_k == 0 and cfg.rollout.top_p == 1.0, "ppo.old_logp_source",
               "rollout needs rollout.top_k 0 and rollout.top_p 1.0 (the engine's logprobs are of the filtered "
               "distribution, the training forward's are not)")
        _check(p.mismatch_reject is None, "ppo.mismatch_reject",
               "needs ppo.old_logp_source: trainer (every row's trainer logprobs)")
        _check(p.tis_cap is None, "ppo.old_logp_source",
               "rollout makes ppo.tis_cap a no-op (old and rollout logprobs are the same); set tis_cap null")
    if p.async_rollout:
        _check(p.old_logp_source == "trainer", "ppo.async_rollout",
               "needs ppo.old_logp_source: trainer (the trainer rescores each stale batch with the current "
               "weights; the rollout logprobs are the behaviour policy of the importance weights)")
        _check(p.tis_cap is not None, "ppo.tis_cap",
               "must be set with ppo.async_rollout (truncated importance weights exp(trainer - rollout logprob) "
               "correct the one-step-stale batches); e.g. ppo.tis_cap=2.0")
    r = cfg.rollout
    _check(cfg.engine.actor != "megatron" or (r.top_k == 0 and r.top_p == 1.0), "engine.actor",
           "megatron has no vocab-parallel top-k / top-p filtering yet: use rollout.top_k 0 and rollout.top_p 1.0")
    if r.engine == "hf":
        _check(r.num_engines == 1 and r.tensor_parallel_size == 1, "rollout.num_engines",
               "the hf engine runs one engine without tensor parallelism (num_engines and tensor_parallel_size 1)")
    _check(r.weight_sync != "broadcast" or r.engine == "vllm", "rollout.weight_sync",
           "broadcast needs rollout.engine: vllm")
    _check(r.tensor_parallel_size == 1 or c.gpus_per_worker > 0, "rollout.tensor_parallel_size",
           "tensor parallelism needs GPUs (cluster.gpus_per_worker > 0)")
    t = cfg.model.tiny
    if cfg.model.actor == "tiny":
        _check(t.hidden_size % t.num_heads == 0, "model.tiny.num_heads",
               f"{t.num_heads} does not divide model.tiny.hidden_size {t.hidden_size}")
    from rlhf.placement import PlacementError, make_plan, spec_from_ppo_config  # no ray at import

    try:
        make_plan(spec_from_ppo_config(cfg))
    except PlacementError as e:
        raise ConfigError(f"cluster: {e}") from None
    _check((cfg.reward.model is None) != (cfg.reward.function is None), "reward",
           "set exactly one of reward.model and reward.function")
    for key, spec in [("reward.function", cfg.reward.function), ("reward.metrics", cfg.reward.metrics)]:
        if spec is not None:
            mod, _, fn = spec.partition(":")
            _check(bool(mod) and bool(fn), key, f"expected module:function, got {spec!r}")
    lg = cfg.trainer.loggers
    _check("jsonl" in lg and len(set(lg)) == len(lg), "trainer.loggers",
           f"must list jsonl (metrics.jsonl is what resume, the detectors and rlhf report read), each logger once; got {lg}")
    import importlib.util

    _check("wandb" not in lg or importlib.util.find_spec("wandb") is not None, "trainer.loggers",
           "wandb is not installed (pip install 'wandb>=0.17', the project's [wandb] extra)")
    from rlhf.data import check_builtin

    check_builtin(cfg.data.path)
    if check_paths:
        paths = [("model.reference", cfg.model.reference), ("model.critic", cfg.model.critic),
                 ("model.tokenizer", cfg.model.tokenizer), ("model.bai_recipe", cfg.model.bai_recipe),
                 ("reward.model", cfg.reward.model)]
        if cfg.model.actor != "tiny" and cfg.model.bai_recipe is None:
            paths.append(("model.actor", cfg.model.actor))
        for key, path in paths:
            _check(path is None or Path(path).exists(), key, f"path does not exist: {path}")
        from rlhf.data import check_prompts

        check_prompts(cfg.data)
    return cfg


def weight_sync_mode(cfg: PPOConfig) -> str:
    """``rollout.weight_sync`` with ``auto`` resolved: ``broadcast`` or ``reload``."""
    if cfg.rollout.weight_sync != "auto":
        return cfg.rollout.weight_sync
    return "broadcast" if cfg.rollout.engine == "vllm" and not cfg.cluster.colocate else "reload"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                check_paths: bool = True) -> PPOConfig:
    """Read YAML (default: the tiny CPU config), apply dotted overrides, validate.

    Raises ``ConfigError`` naming the key, or the file and line, before any work; with
    ``check_paths`` the input paths must exist and the prompts file must parse (``rlhf.data
    .check_prompts``). Only reads files."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        data = load_mapping(path, "config")
    except ConfigError:
        raise
    except UserError as e:
        raise ConfigError(str(e)) from None
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
    """Write the resolved config as YAML (atomically: a reader sees the old file or the new one)."""
    from bairlhf.outputs import atomic_write

    atomic_write(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- documentation

def _field_docs(cls) -> dict[str, str]:
    """Field name -> its docstring (the string literal after the field in the class body)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    out = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
            out[a.target.id] = " ".join(b.value.value.split())
    return out


def numeric_fields(cls, where: str = "") -> list[tuple[str, object, str | None, str]]:
    """Every numeric field of a config tree: (dotted key, default, valid range or None, docstring).

    Ranges come from ``Annotated[..., Range]`` (also inside ``X | None`` and on each item of a
    ``tuple``); booleans are not numeric. Used by ``docs/config_ranges.md`` and by the test that
    no numeric field goes without a range."""
    import typing

    from bairlhf.typed_config import Range as _Range

    def unannotate(tp):
        if typing.get_origin(tp) is Annotated:
            return typing.get_args(tp)[0], [m for m in tp.__metadata__ if isinstance(m, _Range)]
        return tp, []

    def numeric(tp) -> tuple[bool, str | None]:
        base, ranges = unannotate(tp)
        if typing.get_origin(base) in (typing.Union, __import__("types").UnionType):
            inner = [a for a in typing.get_args(base) if a is not type(None)]
            if len(inner) == 1:
                ok, r = numeric(inner[0])
                return ok, r
        if typing.get_origin(base) is tuple:
            items = [numeric(a) for a in typing.get_args(base)]
            if items and all(ok for ok, _ in items):
                rs = {r for _, r in items}
                return True, (f"each {rs.pop()}" if len(rs) == 1 and None not in rs else None)
        if base in (int, float):
            return True, str(ranges[0]) if ranges else None
        return False, None

    out = []
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls, include_extras=True)[f.name]
        key = f"{where}.{f.name}" if where else f.name
        base, _ = unannotate(tp)
        inner = [a for a in typing.get_args(base) if a is not type(None)] or [base]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            out += numeric_fields(inner[0], key)
            continue
        ok, r = numeric(tp)
        if ok:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
            out.append((key, default, r, docs.get(f.name, "")))
    return out


def ranges_markdown() -> str:
    """``docs/config_ranges.md``: the valid range of every numeric field and the choices of every
    enum, of the ``rlhf train`` config (``PPOConfig``), ``rlhf sft`` and ``rlhf rm``."""
    import re

    from bairlhf.typed_config import field_ranges
    from rlhf.rm import RMConfig
    from rlhf.sft import SFTConfig

    lines = ["# Valid ranges of config values", "",
             "Generated from the config dataclasses (`python -c \"from rlhf.config import ranges_markdown; "
             "print(ranges_markdown(), end='')\" > docs/config_ranges.md`); `tests/rlhf/test_config.py` checks that "
             "it is current and that every numeric field has a range. Every value is checked when the config "
             "is loaded, before any work: `[a, b]` closed, `(a, b)` open, `>= a`, `> a`. Keys are dotted as in "
             "YAML and command-line overrides.", ""]
    for title, cls in [("`rlhf train` / `rlhf plan` (`rlhf.config.PPOConfig`)", PPOConfig),
                       ("`rlhf sft` (`rlhf.sft.SFTConfig`)", SFTConfig), ("`rlhf rm` (`rlhf.rm.RMConfig`)", RMConfig)]:
        lines += [f"## {title}", "", "### Numeric fields", "", "| key | valid range | default | meaning |",
                  "|---|---|---|---|"]
        for key, default, r, doc in numeric_fields(cls):
            meaning = re.split(r"(?<![.])[.]\s+(?=[A-Z])", doc)[0].rstrip(".").replace("|", "\\|")  # 1st sentence
            lines.append(f"| `{key}` | {r or 'any'} | `{default}` | {meaning} |")
        choices = {k: v for k, v in field_ranges(cls).items() if " | " in v}
        if choices:
            lines += ["", "### Choices", "", "| key | one of |", "|---|---|"]
            sep = " \\| "
            lines += [f"| `{k}` | {sep.join(f'`{c}`' for c in v.split(' | '))} |" for k, v in choices.items()]
        lines.append("")
    return "\n".join(lines)


def rollout_check_tol(cfg: PPOConfig) -> float:
    """The step-0 ``kl/rollout_vs_trainer`` tolerance: ``trainer.rollout_check_tol``, or by precision."""
    if cfg.trainer.rollout_check_tol is not None:
        return cfg.trainer.rollout_check_tol
    bf16 = cfg.megatron.bf16 if cfg.engine.actor == "megatron" else cfg.deepspeed.bf16
    return 1e-2 if bf16 and cfg.rollout.engine == "vllm" else 1e-3
