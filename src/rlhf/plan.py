"""`rlhf plan CONFIG.yaml [key.sub=value ...]`: memory per GPU per role, fits-or-not, and a roofline step time.

Input, either of
- the ``rlhf train`` YAML itself (a ``PPOConfig``, e.g. ``configs/ppo/bai_olmoe_8x8.yaml``), with
  the same dotted overrides: its batch sizes, lengths, engines (``engine``, ``deepspeed``,
  ``megatron``) and ``cluster`` section are planned as the trainer would run them, and its
  ``plan`` section (``PlanSettings``: GPU preset, model size, mean response length, vLLM memory
  share, MFU) adds what the trainer does not know. Without ``plan.model`` the architecture is
  read from ``model.actor`` (a local checkpoint's ``config.json``, or the tiny model).
- a plan YAML with sections ``gpu``, ``placement`` (``rlhf.placement.PlacementSpec``),
  ``model`` (and optionally ``critic``), ``workload``, optionally ``engine`` / ``megatron`` (as in
  ``PPOConfig``) and ``ppo_config`` (a ``rlhf train`` YAML whose batch sizes, lengths, precision
  and ZeRO stage fill ``workload`` / ``placement``). Example: ``configs/plan/paper_moe_8x8.yaml``.
A file is a plan YAML when all its top-level keys are plan sections and it has ``ppo_config``
or a ``model.total_params_b``; otherwise it is read as a ``PPOConfig``. Bad input is one
``UserError`` naming the key or file:line (exit 2); exit 0 = fits, 1 = does not fit.

Memory model (bytes per GPU; P = parameters of the role's model, N = ranks of its group)
--------------------------------------------------------------------------------------
- training roles (actor, critic), mixed bf16: weights 2P, gradients 2P, AdamW states 12P (fp32
  master, m, v); fp32 training: 4P + 4P + 8P. ZeRO-1 divides the optimizer states by N, ZeRO-2
  also the gradients, ZeRO-3 also the weights (ZeRO paper, Rajbhandari et al. 2020), plus at
  ZeRO-3 a gather buffer of two layers' full weights (prefetch).
- activations per micro-batch (b sequences of S tokens, L layers, hidden h), bf16, flash
  attention (no S^2 term): with gradient checkpointing the layer inputs ``2 b S h L`` plus one
  layer recomputed ``34 b S h``; without ``34 b S h L`` (Korthikanti et al. 2022, eq. 2 without
  the attention-score term). The actor adds fp32 logits and their gradient ``2 * 4 b S V``.
- megatron-core training roles (``engine.actor / critic: megatron``; TP = t, PP = p, DP = d =
  N / (t p)): weights and gradients are split over the t x p model-parallel ranks; mixed bf16
  holds bf16 weights 2P, fp32 main gradients 4P and fp32 master + AdamW states 12P, fp32 4P +
  4P + 8P (megatron-core distributed-optimizer docs: 18 -> 6 + 12 / d bytes per parameter); the
  distributed optimizer divides the optimizer states by d. Activations per layer without
  sequence parallelism ``b S h (10 + 24 / t)`` (Korthikanti et al. 2022, eq. 2 without the
  attention-score term); a pipeline stage holds L / p layers and, with the 1F1B schedule,
  min(p, micro-batches) micro-batches in flight (the first stage is the worst); full
  recomputation keeps only the layer inputs ``2 b S h`` per layer plus one layer's working set.
  Vocab-parallel logits (actor): ``2 * 4 b S V / t``.
- reference / reward: weights 2P (divided by N at ZeRO-3) and forward activations (the
  reference adds fp32 logits ``4 b S V``).
- rollout (vLLM): weights 2P / TP per GPU; KV cache ``2 * L * kv_heads * head_dim * 2`` bytes
  per token, divided by TP. The engine may take ``vllm_gpu_memory_utilization`` of the GPU;
  what is left after its weights is KV cache: ``concurrency = kv_budget / (S * kv_per_token)``
  sequences decode at once, the rest wait (``waves``).
- A GPU fits when, with ``offload_between_phases`` (vLLM sleep + DeepSpeed offload, OpenRLHF /
  veRL hybrid engine), max(generation phase, training phase) <= usable memory; without it,
  the non-vLLM roles must fit in ``1 - vllm_gpu_memory_utilization`` of the usable memory.
  Usable = ``memory_gb * (1 - reserve_fraction)`` (CUDA context, fragmentation).

Step-time roofline (one PPO step, seconds)
------------------------------------------
- decode: every step of every engine reads its weights (``min(total, active x concurrency)``
  params, MoE experts touched) and the KV of the running sequences from HBM; compute is
  ``2 x active x concurrency`` FLOPs; step time = max(bytes / HBM bandwidth, FLOPs / (peak x
  mfu)) over the engine's TP GPUs; ``response_len_mean x waves`` steps.
- prefill: ``2 x active x prompt tokens`` FLOPs per engine at ``peak x mfu``.
- training: actor and critic ``6 x active x tokens x ppo_epochs`` (+ ``2 x`` recompute with
  checkpointing); forward passes for old logprobs, reference logprobs, values, reward:
  ``2 x active x tokens`` each; divided by the GPUs of the role's group at ``peak x mfu``;
  phases run one after the other (no overlap assumed: an upper bound for colocated runs).
- weight sync: ``2 x total`` bytes from the actor to the engines: over HBM (CUDA IPC) when
  colocated, over the inter-node link otherwise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from bairlhf.errors import UserError
from bairlhf.typed_config import Range, build, yaml_keys
from bairlhf.yamlio import load_mapping
from rlhf.placement import (PlacementError, PlacementPlan, PlacementSpec, make_plan, spec_from_dict,
                            spec_from_ppo_config)

GiB = 1024 ** 3

GPU_PRESETS = {
    "H100-80GB": dict(memory_gb=80.0, bf16_tflops=989.0, hbm_tb_s=3.35, link_gb_s=50.0),
    "H200-141GB": dict(memory_gb=141.0, bf16_tflops=989.0, hbm_tb_s=4.8, link_gb_s=50.0),
    "A100-80GB": dict(memory_gb=80.0, bf16_tflops=312.0, hbm_tb_s=2.04, link_gb_s=25.0),
    "A100-40GB": dict(memory_gb=40.0, bf16_tflops=312.0, hbm_tb_s=1.56, link_gb_s=25.0),
}
GPUName = Literal["H100-80GB", "H200-141GB", "A100-80GB", "A100-40GB"]
"""The preset names (keys of ``GPU_PRESETS``)."""

POS = Range(0, None, lo_open=True)     # > 0
ONE_UP = Range(1, None)                # >= 1
FRACTION = Range(0, 1, lo_open=True)   # (0, 1]
RESERVE = Range(0, 1, hi_open=True)    # [0, 1)


@dataclass
class GPUSpec:
    """One GPU (dense bf16 peak; set the numbers of yours or pick a ``name`` from GPU_PRESETS)."""

    name: str = "H100-80GB"
    """Label; a preset name fills the numbers below unless they are given."""
    memory_gb: Annotated[float, POS] = 80.0
    """Memory per GPU (GB, 1e9 bytes as vendors count; > 0)."""
    bf16_tflops: Annotated[float, POS] = 989.0
    """Dense bf16 peak (TFLOP/s, > 0)."""
    hbm_tb_s: Annotated[float, POS] = 3.35
    """Memory bandwidth (TB/s, > 0)."""
    link_gb_s: Annotated[float, POS] = 50.0
    """Per-GPU inter-node bandwidth (GB/s, > 0; InfiniBand / RoCE), for weight sync across nodes."""
    reserve_fraction: Annotated[float, RESERVE] = 0.1
    """Memory never planned (CUDA context, allocator fragmentation), in [0, 1)."""


@dataclass
class ModelSpec:
    """Architecture numbers the memory model needs (MoE: total vs active parameters)."""

    total_params_b: Annotated[float, POS]
    """All parameters, billions (> 0; what memory holds)."""
    active_params_b: Annotated[float, POS] | None = None
    """Parameters touched per token, billions (> 0, <= total; what FLOPs see); None: dense, = total."""
    layers: Annotated[int, ONE_UP] = 24
    """Decoder layers (>= 1)."""
    hidden: Annotated[int, ONE_UP] = 2048
    """Hidden size (>= 1)."""
    kv_heads: Annotated[int, ONE_UP] = 16
    """Key/value heads (GQA, >= 1)."""
    head_dim: Annotated[int, ONE_UP] = 128
    """Head dimension (>= 1)."""
    vocab: Annotated[int, ONE_UP] = 100352
    """Vocabulary size (>= 1)."""

    @property
    def total(self) -> float:
        return self.total_params_b * 1e9

    @property
    def active(self) -> float:
        return (self.active_params_b if self.active_params_b is not None else self.total_params_b) * 1e9


@dataclass
class Workload:
    """One PPO step's shape."""

    rollout_batch_size: Annotated[int, ONE_UP] = 4096
    """Prompts per step (>= 1; paper: 4096)."""
    n_samples_per_prompt: Annotated[int, ONE_UP] = 1
    """Responses per prompt (>= 1; paper: 1)."""
    mini_batch_size: Annotated[int, ONE_UP] = 512
    """Sequences per optimizer step (>= 1; paper: 512)."""
    micro_batch_size: Annotated[int, ONE_UP] = 1
    """Sequences per forward/backward on one GPU (>= 1)."""
    ppo_epochs: Annotated[int, ONE_UP] = 1
    """Passes over the batch (>= 1)."""
    prompt_len: Annotated[int, ONE_UP] = 1024
    """Prompt tokens (max, >= 1)."""
    response_len_max: Annotated[int, ONE_UP] = 4096
    """Response tokens (max: sizes memory; >= 1)."""
    response_len_mean: Annotated[int, ONE_UP] = 2048
    """Response tokens (mean: sizes time; >= 1, <= response_len_max)."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """``bf16`` (mixed, fp32 master + AdamW) or ``fp32``."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward (DeepSpeed roles; megatron roles use ``megatron.recompute``)."""
    offload_between_phases: bool = True
    """vLLM sleeps during training and training states leave the GPU during generation."""
    vllm_gpu_memory_utilization: Annotated[float, FRACTION] = 0.5
    """Fraction of the usable GPU memory vLLM may take (weights + KV), in (0, 1]."""
    mfu: Annotated[float, FRACTION] = 0.35
    """Achieved fraction of peak FLOPs in compute-bound phases, in (0, 1]."""


@dataclass
class PlanSettings:
    """The ``plan:`` section of a ``rlhf train`` config: what ``rlhf plan`` needs beyond the trainer's
    own keys (hardware, model size, mean lengths). The trainer ignores it."""

    gpu: GPUName = "H100-80GB"
    """GPU preset (``GPU_PRESETS``): memory, bf16 peak, HBM and inter-node bandwidth."""
    memory_gb: Annotated[float, POS] | None = None
    """Memory per GPU in GB (> 0), overriding the preset's; None: the preset's."""
    reserve_fraction: Annotated[float, RESERVE] = 0.1
    """Memory never planned (CUDA context, fragmentation), in [0, 1)."""
    gpus_per_node: Annotated[int, ONE_UP] = 8
    """GPUs per node (>= 1) when ``cluster.gpus_per_node`` is not set."""
    model: ModelSpec | None = None
    """Actor (and reference) architecture; None: read from ``model.actor`` (a local checkpoint's
    ``config.json`` or ``model.tiny``)."""
    critic: ModelSpec | None = None
    """Critic (and reward model) architecture; None: the actor's."""
    response_len_mean: Annotated[int, ONE_UP] | None = None
    """Mean response tokens (>= 1; sizes time); None: half of ``rollout.max_new_tokens``."""
    gradient_checkpointing: bool = True
    """DeepSpeed roles recompute activations in backward."""
    offload_between_phases: bool = True
    """vLLM sleeps during training and training states leave the GPU during generation."""
    vllm_gpu_memory_utilization: Annotated[float, FRACTION] = 0.5
    """Fraction of the usable GPU memory vLLM may take, in (0, 1]."""
    mfu: Annotated[float, FRACTION] = 0.35
    """Achieved fraction of peak FLOPs in compute-bound phases, in (0, 1]."""


@dataclass
class PlanInput:
    gpu: GPUSpec
    placement: PlacementSpec
    model: ModelSpec
    critic: ModelSpec
    workload: Workload
    engines: dict = field(default_factory=lambda: {"actor": "deepspeed", "critic": "deepspeed"})
    """Training engine per role (``rlhf.config.EngineChoice``)."""
    megatron: Any = None
    """``rlhf.config.MegatronConfig`` of the megatron roles (None: the defaults)."""


@dataclass
class RoleMemory:
    """Bytes one GPU holds for one role."""

    role: str
    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    kv_cache: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.kv_cache


@dataclass
class PlanResult:
    """What ``rlhf plan`` prints."""

    per_gpu: dict[str, list[RoleMemory]]
    """``"node/gpu"`` -> roles on it (only distinct layouts are kept: first GPU of each group)."""
    peak_gb: dict[str, float]
    """Per listed GPU: planned peak (GB)."""
    usable_gb: float
    fits: bool
    problems: list[str]
    vllm: dict
    """engines, TP, sequences per engine, KV per sequence, concurrency, waves."""
    step_time_s: dict[str, float]
    """decode, prefill, train, sync, total."""


# ------------------------------------------------------------------------------ memory

def training_state_bytes(params: float, precision: str, zero_stage: int, n: int) -> tuple[float, float, float]:
    """(weights, gradients, optimizer states) bytes per GPU under ZeRO ``zero_stage`` over ``n`` ranks."""
    w, g, o = (2.0, 2.0, 12.0) if precision == "bf16" else (4.0, 4.0, 8.0)
    return (params * w / (n if zero_stage >= 3 else 1), params * g / (n if zero_stage >= 2 else 1),
            params * o / (n if zero_stage >= 1 else 1))


def activation_bytes(m: ModelSpec, b: int, s: int, checkpointing: bool, backward: bool) -> float:
    """Activations of one micro-batch (bf16, flash attention)."""
    layer = 34.0 * b * s * m.hidden
    if not backward:
        return layer + 2.0 * b * s * m.hidden
    return 2.0 * b * s * m.hidden * m.layers + layer if checkpointing else layer * m.layers


def kv_bytes_per_token(m: ModelSpec, tp: int) -> float:
    return 2.0 * m.layers * m.kv_heads * m.head_dim * 2.0 / tp


def megatron_state_bytes(params: float, bf16: bool, tp: int, pp: int, dp: int,
                         distributed_optimizer: bool) -> tuple[float, float, float]:
    """(weights, gradients, optimizer states) bytes per GPU of a megatron-core role: split over the
    ``tp x pp`` model-parallel ranks; the distributed optimizer also divides the states by ``dp``."""
    w, g, o = (2.0, 4.0, 12.0) if bf16 else (4.0, 4.0, 8.0)
    mp = tp * pp
    return params * w / mp, params * g / mp, params * o / mp / (dp if distributed_optimizer else 1)


def megatron_activation_bytes(m: ModelSpec, b: int, s: int, tp: int, pp: int, micro_batches: int,
                              recompute: bool) -> float:
    """Activations on the first (fullest) pipeline stage: L / pp layers x min(pp, micro-batches) in flight."""
    per_layer = b * s * m.hidden * (10.0 + 24.0 / tp)
    stage_layers = math.ceil(m.layers / pp)
    in_flight = min(pp, max(micro_batches, 1))
    if recompute:
        return 2.0 * b * s * m.hidden * stage_layers * in_flight + per_layer
    return per_layer * stage_layers * in_flight


def _megatron(inp: PlanInput):
    if inp.megatron is not None:
        return inp.megatron
    from rlhf.config import MegatronConfig  # imported here: rlhf.config imports this module

    return MegatronConfig()


def role_memory(role: str, inp: PlanInput, n: int) -> RoleMemory:
    wl, z = inp.workload, inp.placement.zero_stage
    s = wl.prompt_len + wl.response_len_max
    b = wl.micro_batch_size
    r = RoleMemory(role)
    if role in ("actor", "critic") and inp.engines.get(role, "deepspeed") == "megatron":
        m = inp.model if role == "actor" else inp.critic
        mg = _megatron(inp)
        tp, pp = mg.tensor_parallel, mg.pipeline_parallel
        dp = max(n // (tp * pp), 1)
        r.weights, r.grads, r.optimizer = megatron_state_bytes(m.total, mg.bf16, tp, pp, dp, mg.distributed_optimizer)
        micro_batches = wl.mini_batch_size // (dp * b)
        r.activations = megatron_activation_bytes(m, b, s, tp, pp, micro_batches, mg.recompute)
        if role == "actor":
            r.activations += 2 * 4.0 * b * s * m.vocab / tp  # vocab-parallel fp32 logits and their gradient
    elif role in ("actor", "critic"):
        m = inp.model if role == "actor" else inp.critic
        r.weights, r.grads, r.optimizer = training_state_bytes(m.total, wl.precision, z, n)
        if z >= 3:
            r.weights += 2 * 2.0 * (m.total - 2 * m.vocab * m.hidden) / m.layers  # gather buffer: 2 layers
        r.activations = activation_bytes(m, b, s, wl.gradient_checkpointing, backward=True)
        if role == "actor":
            r.activations += 2 * 4.0 * b * s * m.vocab
    elif role in ("reference", "reward"):
        m = inp.model if role == "reference" else inp.critic
        r.weights = 2.0 * m.total / (n if z >= 3 else 1)
        r.activations = activation_bytes(m, b, s, False, backward=False)
        if role == "reference":
            r.activations += 4.0 * b * s * m.vocab
    return r


def plan(inp: PlanInput) -> PlanResult:
    """Memory per GPU per role, fits-or-not, and the roofline step time."""
    pp = make_plan(inp.placement)
    wl, gpu, m = inp.workload, inp.gpu, inp.model
    usable = gpu.memory_gb * 1e9 * (1 - gpu.reserve_fraction)
    tp = inp.placement.vllm_tp
    engines = pp.vllm_engines
    seqs = wl.rollout_batch_size * wl.n_samples_per_prompt
    seqs_per_engine = math.ceil(seqs / engines)
    s_max = wl.prompt_len + wl.response_len_max
    kv_tok = kv_bytes_per_token(m, tp)
    vllm_weights = 2.0 * m.total / tp
    vllm_budget = usable * wl.vllm_gpu_memory_utilization
    kv_budget = vllm_budget - vllm_weights
    concurrency = max(0, int(kv_budget // (s_max * kv_tok)))
    waves = math.ceil(seqs_per_engine / concurrency) if concurrency else math.inf

    problems: list[str] = []
    for role in ("actor", "critic"):
        if inp.engines.get(role, "deepspeed") == "megatron" and pp.of(role):
            mg = _megatron(inp)
            if pp.world_size(role) % (mg.tensor_parallel * mg.pipeline_parallel):
                raise PlacementError(f"megatron.tensor_parallel: {mg.tensor_parallel} x pipeline_parallel "
                                     f"{mg.pipeline_parallel} does not divide the {pp.world_size(role)} {role} ranks")
    per_gpu, peak = {}, {}
    cursor = 0
    for gi, g in enumerate(inp.placement.groups):
        node, idx = divmod(cursor, inp.placement.gpus_per_node)
        cursor += g.gpus
        key = f"node{node}/gpu{idx}"
        mems = [role_memory(r, inp, g.gpus) for r in g.roles if r != "rollout"]
        train_phase = sum(x.total for x in mems)
        if "rollout" in g.roles:
            rv = RoleMemory("rollout", weights=vllm_weights, kv_cache=max(kv_budget, 0.0))
            mems.append(rv)
            if wl.offload_between_phases:
                gpu_peak = max(train_phase, rv.total)
                if train_phase > usable:
                    problems.append(f"{key} (group {gi}): training phase needs {train_phase / 1e9:.1f} GB "
                                    f"> usable {usable / 1e9:.1f} GB")
            else:
                gpu_peak = train_phase + rv.total
                if train_phase > usable - vllm_budget:
                    problems.append(f"{key} (group {gi}): non-vLLM roles need {train_phase / 1e9:.1f} GB > the "
                                    f"{(usable - vllm_budget) / 1e9:.1f} GB vLLM leaves "
                                    f"(vllm_gpu_memory_utilization {wl.vllm_gpu_memory_utilization})")
            if concurrency < 1:
                problems.append(f"{key} (group {gi}): vLLM weights {vllm_weights / 1e9:.1f} GB leave no KV cache "
                                f"for one {s_max}-token sequence in {vllm_budget / 1e9:.1f} GB "
                                f"(raise vllm_tp or vllm_gpu_memory_utilization)")
        else:
            gpu_peak = train_phase
            if train_phase > usable:
                problems.append(f"{key} (group {gi}): needs {train_phase / 1e9:.1f} GB > usable {usable / 1e9:.1f} GB")
        per_gpu[key] = mems
        peak[key] = gpu_peak / 1e9

    step = step_time(inp, pp, seqs_per_engine, concurrency, waves, kv_tok)
    vllm = {"engines": engines, "tp": tp, "sequences_per_engine": seqs_per_engine,
            "kv_gb_per_sequence": s_max * kv_tok / 1e9, "kv_budget_gb": kv_budget / 1e9,
            "concurrency": concurrency, "waves": waves}
    return PlanResult(per_gpu=per_gpu, peak_gb=peak, usable_gb=usable / 1e9, fits=not problems, problems=problems,
                      vllm=vllm, step_time_s=step)


def step_time(inp: PlanInput, pp: PlacementPlan, seqs_per_engine: int, concurrency: int, waves: float,
              kv_tok: float) -> dict[str, float]:
    wl, gpu, m, c = inp.workload, inp.gpu, inp.model, inp.critic
    peak = gpu.bf16_tflops * 1e12
    bw = gpu.hbm_tb_s * 1e12
    tp = inp.placement.vllm_tp
    seqs = wl.rollout_batch_size * wl.n_samples_per_prompt
    run = min(concurrency, seqs_per_engine) or 1
    ctx = wl.prompt_len + wl.response_len_mean / 2
    bytes_step = 2.0 * min(m.total, m.active * run) / tp + run * ctx * kv_tok
    flops_step = 2.0 * m.active * run / tp
    decode = wl.response_len_mean * (waves if math.isfinite(waves) else 1) * max(bytes_step / bw,
                                                                                flops_step / (peak * wl.mfu))
    prefill = 2.0 * m.active * seqs_per_engine * wl.prompt_len / (peak * wl.mfu * tp)
    tokens = seqs * (wl.prompt_len + wl.response_len_mean)
    def ckpt_of(role: str) -> float:
        if inp.engines.get(role, "deepspeed") == "megatron":
            return 2.0 if _megatron(inp).recompute else 0.0
        return 2.0 if wl.gradient_checkpointing else 0.0

    gpus = {r: max(pp.world_size(r), 1) for r in ("actor", "critic", "reference", "reward")}
    train = 0.0
    train += (6.0 + ckpt_of("actor")) * m.active * tokens * wl.ppo_epochs / (gpus["actor"] * peak * wl.mfu)
    train += 2.0 * m.active * tokens / (gpus["actor"] * peak * wl.mfu)  # old logprobs
    if pp.of("critic"):
        train += (6.0 + ckpt_of("critic")) * c.active * tokens * wl.ppo_epochs / (gpus["critic"] * peak * wl.mfu)
        train += 2.0 * c.active * tokens / (gpus["critic"] * peak * wl.mfu)  # values
    if pp.of("reference"):
        train += 2.0 * m.active * tokens / (gpus["reference"] * peak * wl.mfu)
    if pp.of("reward"):
        train += 2.0 * c.active * tokens / (gpus["reward"] * peak * wl.mfu)
    colocated = any("actor" in g.roles and "rollout" in g.roles for g in inp.placement.groups)
    sync = 2.0 * m.total / (bw if colocated else gpu.link_gb_s * 1e9)
    return {"decode": decode, "prefill": prefill, "train": train, "sync": sync,
            "total": decode + prefill + train + sync}


# ------------------------------------------------------------------------------ config

@dataclass
class PlanFile:
    """The top-level sections of a plan YAML (``build``), each a mapping built by its own dataclass
    once ``ppo_config`` has filled in ``workload`` / ``placement``."""

    model: dict
    """``ModelSpec`` of the actor (and reference); required."""
    gpu: dict | None = None
    """``GPUSpec``; a preset ``name`` fills the numbers not given."""
    placement: dict | None = None
    """``rlhf.placement.PlacementSpec``; None with ``ppo_config``: the trainer's own ``cluster`` section."""
    critic: dict | None = None
    """``ModelSpec`` of the critic (and reward model); None: the actor's."""
    workload: dict | None = None
    """``Workload``; keys not given come from ``ppo_config`` (or the defaults)."""
    ppo_config: str | None = None
    """A ``rlhf train`` YAML (relative to this file) whose batch sizes, lengths, precision, ZeRO stage
    and engines fill the sections above."""
    engine: dict | None = None
    """``rlhf.config.EngineChoice``: training engine per role."""
    megatron: dict | None = None
    """``rlhf.config.MegatronConfig`` of the megatron roles."""


PLAN_SECTIONS = tuple(yaml_keys(PlanFile))
"""Top-level sections of a plan YAML."""


def is_plan_yaml(data: dict) -> bool:
    """A plan YAML has a section only plan YAMLs have, or a ``model.total_params_b``; anything else
    is read as a ``rlhf train`` config."""
    model = data.get("model")
    return any(k in data for k in ("gpu", "placement", "workload", "ppo_config", "critic")) or (
        isinstance(model, dict) and "total_params_b" in model)


def load_plan_input(path: str | Path, overrides: list[str] | None = None) -> PlanInput:
    """Read and validate a plan YAML or a ``rlhf train`` config (errors name the key or file:line)."""
    from rlhf.config import apply_overrides

    path = Path(path)
    try:
        data = load_mapping(path, "config")
    except UserError as e:
        raise PlacementError(str(e)) from None
    if not is_plan_yaml(data):
        from rlhf.config import load_config

        return plan_input_from_ppo(load_config(path, overrides, check_paths=False))
    apply_overrides(data, list(overrides or []))
    pf = build(PlanFile, data, "", PlacementError, unknown="{path}: unknown section (known: {known})",
               missing="{path}: missing (total_params_b, active_params_b, layers, hidden, ...)")
    gpu_data = pf.gpu or {}
    name = gpu_data.get("name", "H100-80GB")
    preset = GPU_PRESETS.get(name) if isinstance(name, str) else None   # not a str: build names gpu.name
    gpu = build(GPUSpec, {**(preset or {}), **gpu_data}, "gpu", PlacementError)
    placement_data, workload_data = dict(pf.placement or {}), dict(pf.workload or {})
    placement = None
    from rlhf.config import EngineChoice, MegatronConfig

    engine = build(EngineChoice, pf.engine, "engine", PlacementError)
    megatron = build(MegatronConfig, pf.megatron, "megatron", PlacementError)
    if pf.ppo_config:
        from rlhf.config import load_config

        ppo_path = Path(pf.ppo_config) if Path(pf.ppo_config).is_absolute() else path.parent / pf.ppo_config
        cfg = load_config(ppo_path, check_paths=False)
        p = cfg.ppo
        from_ppo = dict(rollout_batch_size=p.rollout_batch_size, n_samples_per_prompt=p.n_samples_per_prompt,
                        mini_batch_size=p.mini_batch_size, micro_batch_size=p.micro_batch_size,
                        ppo_epochs=p.ppo_epochs, prompt_len=cfg.data.max_prompt_tokens,
                        response_len_max=cfg.rollout.max_new_tokens,
                        response_len_mean=max(1, cfg.rollout.max_new_tokens // 2),
                        precision="bf16" if cfg.deepspeed.bf16 else "fp32")
        workload_data = {**from_ppo, **workload_data}
        placement_data.setdefault("zero_stage", cfg.deepspeed.zero_stage)
        if pf.engine is None:
            engine, megatron = cfg.engine, cfg.megatron
        if pf.placement is None:  # the trainer's own cluster section, on 8-GPU nodes
            placement = spec_from_ppo_config(cfg, gpus_per_node=8)
    workload = build(Workload, workload_data, "workload", PlacementError)
    _check_workload(workload, "workload")
    model = build(ModelSpec, pf.model, "model", PlacementError)
    critic = build(ModelSpec, pf.critic, "critic", PlacementError) if pf.critic else model
    for key, ms in (("model", model), ("critic", critic)):
        _check_model(ms, key)
    if placement is None:
        placement = spec_from_dict(placement_data)
    return PlanInput(gpu=gpu, placement=placement, model=model, critic=critic, workload=workload,
                     engines={"actor": engine.actor, "critic": engine.critic}, megatron=megatron)


def _check_workload(w: Workload, where: str) -> None:
    if w.response_len_mean > w.response_len_max:
        raise PlacementError(f"{where}.response_len_mean: {w.response_len_mean} exceeds response_len_max "
                             f"{w.response_len_max}")


def _check_model(m: ModelSpec, where: str) -> None:
    if m.active_params_b is not None and m.active_params_b > m.total_params_b:
        raise PlacementError(f"{where}.active_params_b: {m.active_params_b:g} exceeds total_params_b "
                             f"{m.total_params_b:g}")


def model_spec_from_hf(hf: dict, where: str) -> ModelSpec:
    """Parameter counts and shapes from a Hugging Face ``config.json`` (dense or MoE decoder)."""
    try:
        h, L = int(hf["hidden_size"]), int(hf["num_hidden_layers"])
        heads = int(hf["num_attention_heads"])
        kv = int(hf.get("num_key_value_heads") or heads)
        hd = int(hf.get("head_dim") or h // heads)
        vocab = int(hf["vocab_size"])
        experts = int(hf.get("num_experts") or hf.get("num_local_experts") or 0)
        ffn = int(hf.get("moe_intermediate_size") or hf["intermediate_size"]) if experts else int(hf["intermediate_size"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise PlacementError(f"{where}: config.json lacks the architecture numbers ({e}); set plan.model") from None
    attn = h * heads * hd * 2 + h * kv * hd * 2
    mlp_one = 3 * h * ffn
    top_k = int(hf.get("num_experts_per_tok") or 1)
    mlp_total = mlp_one * (experts or 1) + (h * experts if experts else 0)
    mlp_active = mlp_one * (top_k if experts else 1) + (h * experts if experts else 0)
    embed = vocab * h * (1 if hf.get("tie_word_embeddings") else 2)
    total = embed + L * (attn + mlp_total + 2 * h) + h
    active = embed + L * (attn + mlp_active + 2 * h) + h
    return ModelSpec(total_params_b=total / 1e9, active_params_b=active / 1e9 if experts else None, layers=L,
                     hidden=h, kv_heads=kv, head_dim=hd, vocab=vocab)


def model_spec_from_ppo(cfg) -> ModelSpec:
    """The actor's architecture: ``plan.model``, else the tiny model's, else the actor checkpoint's."""
    if cfg.plan.model is not None:
        return cfg.plan.model
    m = cfg.model
    if m.actor == "tiny" and m.bai_recipe is None:
        t = m.tiny
        return model_spec_from_hf({"hidden_size": t.hidden_size, "num_hidden_layers": t.num_layers,
                                   "num_attention_heads": t.num_heads, "vocab_size": 384,
                                   "intermediate_size": 2 * t.hidden_size}, "model.tiny")
    cfg_json = Path(m.actor) / "config.json"
    if m.bai_recipe is not None or not cfg_json.is_file():
        why = "the actor is a bai merge (model.bai_recipe)" if m.bai_recipe else f"{cfg_json} does not exist"
        raise PlacementError(f"plan.model: needed ({why}); give total_params_b, layers, hidden, kv_heads, "
                             f"head_dim, vocab")
    try:
        hf = json.loads(cfg_json.read_text())
    except (OSError, ValueError) as e:
        raise PlacementError(f"{cfg_json}: not readable JSON ({e}); set plan.model") from None
    if not isinstance(hf, dict):
        raise PlacementError(f"{cfg_json}: expected a JSON object; set plan.model")
    return model_spec_from_hf(hf, str(cfg_json))


def plan_input_from_ppo(cfg) -> PlanInput:
    """The plan of a ``rlhf train`` config (``rlhf.config.PPOConfig``) as the trainer would run it."""
    ps = cfg.plan
    gpu_data = {**GPU_PRESETS[ps.gpu], "name": ps.gpu, "reserve_fraction": ps.reserve_fraction}
    if ps.memory_gb is not None:
        gpu_data["memory_gb"] = ps.memory_gb
    gpu = build(GPUSpec, gpu_data, "plan", PlacementError)
    placement = spec_from_ppo_config(cfg, gpus_per_node=cfg.cluster.gpus_per_node or ps.gpus_per_node)
    model = model_spec_from_ppo(cfg)
    critic = ps.critic or model
    for key, ms in (("plan.model", model), ("plan.critic", critic)):
        _check_model(ms, key)
    p, r = cfg.ppo, cfg.rollout
    workload = Workload(rollout_batch_size=p.rollout_batch_size, n_samples_per_prompt=p.n_samples_per_prompt,
                        mini_batch_size=p.mini_batch_size, micro_batch_size=p.micro_batch_size,
                        ppo_epochs=p.ppo_epochs, prompt_len=cfg.data.max_prompt_tokens,
                        response_len_max=r.max_new_tokens,
                        response_len_mean=ps.response_len_mean or max(1, r.max_new_tokens // 2),
                        precision="bf16" if cfg.deepspeed.bf16 else "fp32",
                        gradient_checkpointing=ps.gradient_checkpointing,
                        offload_between_phases=ps.offload_between_phases,
                        vllm_gpu_memory_utilization=ps.vllm_gpu_memory_utilization, mfu=ps.mfu)
    if workload.response_len_mean > workload.response_len_max:
        raise PlacementError(f"plan.response_len_mean: {workload.response_len_mean} exceeds rollout.max_new_tokens "
                             f"{workload.response_len_max}")
    return PlanInput(gpu=gpu, placement=placement, model=model, critic=critic, workload=workload,
                     engines={"actor": cfg.engine.actor, "critic": cfg.engine.critic}, megatron=cfg.megatron)


# ------------------------------------------------------------------------------ CLI

def render(inp: PlanInput, res: PlanResult) -> str:
    engines, placed = [], make_plan(inp.placement)
    for role in ("actor", "critic") if placed.of("critic") else ("actor",):  # critic-free: none placed
        if inp.engines.get(role, "deepspeed") == "megatron":
            mg = _megatron(inp)
            engines.append(f"{role} megatron (TP {mg.tensor_parallel}, PP {mg.pipeline_parallel}, "
                           f"{'distributed optimizer, ' if mg.distributed_optimizer else ''}"
                           f"{'recompute, ' if mg.recompute else ''}{'bf16' if mg.bf16 else 'fp32'})")
        else:
            engines.append(f"{role} deepspeed (ZeRO-{inp.placement.zero_stage}, {inp.workload.precision})")
    lines = [placed.describe(), "engines: " + ", ".join(engines),
             f"model: {inp.model.total_params_b:g}B total / {inp.model.active_params_b or inp.model.total_params_b:g}B "
             f"active; GPU {inp.gpu.name}: {inp.gpu.memory_gb:g} GB, usable {res.usable_gb:.1f} GB",
             "", f"{'GPU':<12} {'role':<10} {'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'kv':>8} {'total':>8}  (GB)"]
    for key, mems in res.per_gpu.items():
        for mem in mems:
            lines.append(f"{key:<12} {mem.role:<10} " + " ".join(
                f"{v / 1e9:8.2f}" for v in (mem.weights, mem.grads, mem.optimizer, mem.activations, mem.kv_cache,
                                            mem.total)))
        lines.append(f"{key:<12} {'peak':<10} {res.peak_gb[key]:>53.2f}")
    v = res.vllm
    lines += ["", f"vLLM: {v['engines']} engines x TP {v['tp']}, {v['sequences_per_engine']} sequences each, "
                  f"KV {v['kv_gb_per_sequence']:.3f} GB/sequence, budget {v['kv_budget_gb']:.1f} GB -> "
                  f"{v['concurrency']} concurrent, {v['waves']} wave(s)",
              "step time (roofline): " + ", ".join(f"{k} {t:.1f}s" for k, t in res.step_time_s.items()),
              "FITS" if res.fits else "DOES NOT FIT:\n  " + "\n  ".join(res.problems)]
    return "\n".join(lines)
