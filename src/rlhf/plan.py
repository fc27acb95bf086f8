"""`rlhf plan CONFIG.yaml`: memory per GPU per role, fits-or-not, and a roofline step time.

Input: a plan YAML with sections ``gpu``, ``placement`` (``rlhf.placement.PlacementSpec``),
``model`` (and optionally ``critic``), ``workload`` and optionally ``ppo_config`` (a ``rlhf
train`` YAML whose batch sizes, lengths, precision and ZeRO stage fill ``workload`` /
``placement``; without a ``placement`` section its ``cluster`` section is used, 8 GPUs a node).
Example: ``configs/plan/paper_moe_8x8.yaml`` (the paper's MoE, 25B total / 2.5B active, 8 x 8
80 GB GPUs).

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

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from rlhf.placement import (PlacementError, PlacementPlan, PlacementSpec, make_plan, spec_from_dict,
                            spec_from_ppo_config)
from bairlhf.typed_config import build

GiB = 1024 ** 3

GPU_PRESETS = {
    "H100-80GB": dict(memory_gb=80.0, bf16_tflops=989.0, hbm_tb_s=3.35, link_gb_s=50.0),
    "H200-141GB": dict(memory_gb=141.0, bf16_tflops=989.0, hbm_tb_s=4.8, link_gb_s=50.0),
    "A100-80GB": dict(memory_gb=80.0, bf16_tflops=312.0, hbm_tb_s=2.04, link_gb_s=25.0),
    "A100-40GB": dict(memory_gb=40.0, bf16_tflops=312.0, hbm_tb_s=1.56, link_gb_s=25.0),
}


@dataclass
class GPUSpec:
    """One GPU (dense bf16 peak; set the numbers of yours or pick a ``name`` from GPU_PRESETS)."""

    name: str = "H100-80GB"
    """Label; a preset name fills the numbers below unless they are given."""
    memory_gb: float = 80.0
    """Memory per GPU (GB, 1e9 bytes as vendors count)."""
    bf16_tflops: float = 989.0
    """Dense bf16 peak."""
    hbm_tb_s: float = 3.35
    """Memory bandwidth."""
    link_gb_s: float = 50.0
    """Per-GPU inter-node bandwidth (InfiniBand / RoCE), for weight sync across nodes."""
    reserve_fraction: float = 0.1
    """Memory never planned (CUDA context, allocator fragmentation)."""


@dataclass
class ModelSpec:
    """Architecture numbers the memory model needs (MoE: total vs active parameters)."""

    total_params_b: float
    """All parameters, billions (what memory holds)."""
    active_params_b: float | None = None
    """Parameters touched per token, billions (what FLOPs see); None: dense, = total."""
    layers: int = 24
    """Decoder layers."""
    hidden: int = 2048
    """Hidden size."""
    kv_heads: int = 16
    """Key/value heads (GQA)."""
    head_dim: int = 128
    """Head dimension."""
    vocab: int = 100352
    """Vocabulary size."""

    @property
    def total(self) -> float:
        return self.total_params_b * 1e9

    @property
    def active(self) -> float:
        return (self.active_params_b if self.active_params_b is not None else self.total_params_b) * 1e9


@dataclass
class Workload:
    """One PPO step's shape."""

    rollout_batch_size: int = 4096
    """Prompts per step (paper: 4096)."""
    n_samples_per_prompt: int = 1
    """Responses per prompt (paper: 1)."""
    mini_batch_size: int = 512
    """Sequences per optimizer step (paper: 512)."""
    micro_batch_size: int = 1
    """Sequences per forward/backward on one GPU."""
    ppo_epochs: int = 1
    """Passes over the batch."""
    prompt_len: int = 1024
    """Prompt tokens (max)."""
    response_len_max: int = 4096
    """Response tokens (max: sizes memory)."""
    response_len_mean: int = 2048
    """Response tokens (mean: sizes time)."""
    precision: str = "bf16"
    """``bf16`` (mixed, fp32 master + AdamW) or ``fp32``."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward."""
    offload_between_phases: bool = True
    """vLLM sleeps during training and training states leave the GPU during generation."""
    vllm_gpu_memory_utilization: float = 0.5
    """Fraction of the usable GPU memory vLLM may take (weights + KV)."""
    mfu: float = 0.35
    """Achieved fraction of peak FLOPs in compute-bound phases."""


@dataclass
class PlanInput:
    gpu: GPUSpec
    placement: PlacementSpec
    model: ModelSpec
    critic: ModelSpec
    workload: Workload


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


def role_memory(role: str, inp: PlanInput, n: int) -> RoleMemory:
    wl, z = inp.workload, inp.placement.zero_stage
    s = wl.prompt_len + wl.response_len_max
    b = wl.micro_batch_size
    r = RoleMemory(role)
    if role in ("actor", "critic"):
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
    ckpt = 2.0 if wl.gradient_checkpointing else 0.0
    gpus = {r: max(pp.world_size(r), 1) for r in ("actor", "critic", "reference", "reward")}
    train = 0.0
    train += (6.0 + ckpt) * m.active * tokens * wl.ppo_epochs / (gpus["actor"] * peak * wl.mfu)
    train += 2.0 * m.active * tokens / (gpus["actor"] * peak * wl.mfu)  # old logprobs
    if pp.of("critic"):
        train += (6.0 + ckpt) * c.active * tokens * wl.ppo_epochs / (gpus["critic"] * peak * wl.mfu)
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

def load_plan_input(path: str | Path) -> PlanInput:
    """Read and validate a plan YAML (errors name the key)."""
    path = Path(path)
    if not path.exists():
        raise PlacementError(f"config: file does not exist: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    known = {"gpu", "placement", "model", "critic", "workload", "ppo_config"}
    for k in data:
        if k not in known:
            raise PlacementError(f"{k}: unknown section (known: {', '.join(sorted(known))})")
    if "model" not in data:
        raise PlacementError("model: missing (total_params_b, active_params_b, layers, hidden, ...)")
    gpu_data = dict(data.get("gpu") or {})
    preset = GPU_PRESETS.get(gpu_data.get("name", "H100-80GB"))
    gpu = build(GPUSpec, {**(preset or {}), **gpu_data}, "gpu", PlacementError)
    placement_data = dict(data.get("placement") or {})
    workload_data = dict(data.get("workload") or {})
    placement = None
    if data.get("ppo_config"):
        from rlhf.config import load_config

        ppo_path = (path.parent / data["ppo_config"]) if not Path(data["ppo_config"]).is_absolute() else \
            Path(data["ppo_config"])
        cfg = load_config(ppo_path, check_paths=False)
        p = cfg.ppo
        from_ppo = dict(rollout_batch_size=p.rollout_batch_size, n_samples_per_prompt=p.n_samples_per_prompt,
                        mini_batch_size=p.mini_batch_size, micro_batch_size=p.micro_batch_size,
                        ppo_epochs=p.ppo_epochs, prompt_len=cfg.data.max_prompt_tokens,
                        response_len_max=cfg.rollout.max_new_tokens,
                        precision="bf16" if cfg.deepspeed.bf16 else "fp32")
        workload_data = {**from_ppo, **workload_data}
        placement_data.setdefault("zero_stage", cfg.deepspeed.zero_stage)
        if "placement" not in data:  # the trainer's own cluster section, on 8-GPU nodes
            placement = spec_from_ppo_config(cfg, gpus_per_node=8)
    workload = build(Workload, workload_data, "workload", PlacementError)
    if workload.precision not in ("bf16", "fp32"):
        raise PlacementError(f"workload.precision: bf16 or fp32, got {workload.precision!r}")
    if not 0 < workload.vllm_gpu_memory_utilization <= 1:
        raise PlacementError("workload.vllm_gpu_memory_utilization: must be in (0, 1]")
    model = build(ModelSpec, data["model"], "model", PlacementError)
    critic = build(ModelSpec, data["critic"], "critic", PlacementError) if data.get("critic") else model
    if placement is None:
        placement = spec_from_dict(placement_data)
    return PlanInput(gpu=gpu, placement=placement, model=model, critic=critic,
                     workload=workload)


# ------------------------------------------------------------------------------ CLI

def render(inp: PlanInput, res: PlanResult) -> str:
    lines = [make_plan(inp.placement).describe(),
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


def main(argv: list[str] | None = None) -> int:
    """`rlhf plan CONFIG.yaml [--json]`; exit 0 when it fits, 1 when it does not, 2 on a bad config."""
    ap = argparse.ArgumentParser(prog="rlhf plan", description=__doc__.split("\n")[0])
    ap.add_argument("config", help="plan YAML (see configs/plan/)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ns = ap.parse_args(argv)
    try:
        inp = load_plan_input(ns.config)
        res = plan(inp)
    except (PlacementError, ValueError) as e:
        print(f"rlhf plan: {e}", file=sys.stderr)
        return 2
    if ns.json:
        out = asdict(res)
        out["per_gpu"] = {k: [{**asdict(m), "total": m.total} for m in v] for k, v in res.per_gpu.items()}
        print(json.dumps(out, indent=2, default=str))
    else:
        print(render(inp, res))
    return 0 if res.fits else 1
