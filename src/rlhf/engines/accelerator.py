"""Which accelerator, process-group backend, device and dtype a process uses: CPU or CUDA.

Every decision is a pure function of facts passed in (``cuda_available``, ``env``, ...), so the
whole table of choices is tested on a CPU-only machine without mocking torch or DeepSpeed; only
``detect()`` reads the hardware. The rules:

- DeepSpeed accelerator (``DS_ACCELERATOR``): an explicit, non-empty ``DS_ACCELERATOR`` in the
  environment wins (it must name one of DeepSpeed's accelerators); else ``cuda`` when a CUDA device
  is visible to this process, else ``cpu``. Without this, a Ray worker that defaults the variable
  to ``cpu`` makes DeepSpeed train on the CPU of a GPU node (DeepSpeed itself reads only the
  variable when it is set).
- torch.distributed backend: ``nccl`` on CUDA, ``gloo`` on CPU.
- Weight-sync backend (actor rank 0 -> vLLM workers): ``nccl`` when sender and receivers hold
  different GPUs; NCCL refuses two ranks of one communicator on the same GPU ("Duplicate GPU
  detected", NCCL >= 2.5), so ranks sharing a GPU use ``gloo`` (which broadcasts CUDA tensors
  through host memory) or, better, the in-process reload.
- Device of the frozen roles (reference, reward model, transformers rollout): the process's
  CUDA device when it has one (a Ray worker with a GPU share sees exactly one, as ``cuda:0``),
  else the CPU.
- dtype: ``bfloat16`` weights when bf16 is asked for (all roles alike, so the rollout, reference
  and trainer see the same rounding), else ``float32``; log-probabilities, values and losses are
  always computed in float32. bf16 on a CUDA device without bf16 support (before Ampere) is an
  error, not a silent fallback.

Imports only the standard library at module level (``detect`` imports torch when called).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from bairlhf.errors import UserError

DS_ACCELERATORS = ("cuda", "cpu", "xpu", "npu", "mps", "hpu", "mlu", "sdaa", "supa", "klxpu")
"""Accelerator names DeepSpeed 0.19 accepts in ``DS_ACCELERATOR`` (its ``SUPPORTED_ACCELERATOR_LIST``)."""

DIST_BACKENDS = {"cuda": "nccl", "cpu": "gloo"}
"""torch.distributed backend per accelerator this project runs on."""


class AcceleratorError(UserError):
    """A device / precision request this machine cannot honour (named, before any work)."""


@dataclass(frozen=True)
class Facts:
    """What ``detect()`` read from this process's hardware and environment."""

    cuda_available: bool
    """``torch.cuda.is_available()`` (False when torch is a CPU build)."""
    device_count: int = 0
    """CUDA devices visible to this process (>= 0; after ``CUDA_VISIBLE_DEVICES``)."""
    device_name: str = ""
    """Name of CUDA device 0 (e.g. ``NVIDIA H100 80GB HBM3``); empty without CUDA."""
    bf16_supported: bool = False
    """CUDA device 0 supports bf16 (compute capability >= 8.0); False without CUDA."""
    torch_cuda: str | None = None
    """CUDA version torch was built with (``torch.version.cuda``); None for a CPU build."""


def detect() -> Facts:
    """Read the facts from torch (the one impure function here)."""
    import torch

    ok = bool(torch.cuda.is_available())
    n = torch.cuda.device_count() if ok else 0
    name = torch.cuda.get_device_name(0) if ok and n else ""
    bf16 = bool(ok and n and torch.cuda.is_bf16_supported())
    return Facts(cuda_available=ok, device_count=n, device_name=name, bf16_supported=bf16,
                 torch_cuda=torch.version.cuda)


def ds_accelerator(cuda_available: bool, env: Mapping[str, str] | None = None) -> str:
    """The DeepSpeed accelerator name for this process.

    ``env["DS_ACCELERATOR"]`` wins when set and non-empty (must be one of ``DS_ACCELERATORS``;
    ``cuda`` without a visible CUDA device is refused); else ``cuda`` if ``cuda_available`` else ``cpu``.
    """
    explicit = (env or {}).get("DS_ACCELERATOR", "").strip()
    if explicit:
        if explicit not in DS_ACCELERATORS:
            raise AcceleratorError(f"DS_ACCELERATOR: {explicit!r} is not one of {', '.join(DS_ACCELERATORS)}")
        if explicit == "cuda" and not cuda_available:
            raise AcceleratorError("DS_ACCELERATOR: 'cuda' is set but this process sees no CUDA device "
                                   "(CPU torch build, or CUDA_VISIBLE_DEVICES empty)")
        return explicit
    return "cuda" if cuda_available else "cpu"


def worker_env(base: Mapping[str, str], cuda_available: bool, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Defaults a worker process sets where the environment has none: ``base`` (e.g.
    ``WORKER_ENV`` without its ``DS_ACCELERATOR``) plus the ``DS_ACCELERATOR`` chosen by
    ``ds_accelerator``. Keys already in ``env`` are left out (the caller ``setdefault``s them)."""
    env = dict(env or {})
    out = {k: v for k, v in base.items() if k != "DS_ACCELERATOR" and k not in env}
    if not env.get("DS_ACCELERATOR", "").strip():
        out["DS_ACCELERATOR"] = ds_accelerator(cuda_available, env)
    return out


def dist_backend(accelerator: str) -> str:
    """torch.distributed backend for an accelerator: ``nccl`` on ``cuda``, ``gloo`` on ``cpu``."""
    try:
        return DIST_BACKENDS[accelerator]
    except KeyError:
        raise AcceleratorError(f"accelerator: no process-group backend known for {accelerator!r} "
                               f"(supported: {', '.join(DIST_BACKENDS)})") from None


def weight_sync_backend(cuda_available: bool, shares_gpu: bool) -> str:
    """Backend of the actor -> vLLM broadcast group: ``nccl`` when the sender and every receiver
    are on CUDA and on different GPUs, else ``gloo`` (CPU, or ranks sharing one GPU, which NCCL
    refuses)."""
    return "nccl" if cuda_available and not shares_gpu else "gloo"


def model_device(cuda_available: bool, index: int = 0) -> str:
    """Device string for a model this process holds (reference, reward, transformers rollout):
    ``cuda:INDEX`` with CUDA (index 0 inside a Ray worker with one GPU share), else ``cpu``."""
    if index < 0:
        raise AcceleratorError(f"device index: {index} must be >= 0")
    return f"cuda:{index}" if cuda_available else "cpu"


def weights_dtype(bf16: bool, cuda_available: bool, bf16_supported: bool = True) -> str:
    """dtype name of model weights for every role: ``bfloat16`` when ``bf16`` (CPU, or a CUDA
    device with bf16 support), else ``float32``. Logprobs, values and losses stay float32."""
    if not bf16:
        return "float32"
    if cuda_available and not bf16_supported:
        raise AcceleratorError("deepspeed.bf16: this CUDA device has no bf16 support (compute capability < 8.0); "
                               "set deepspeed.bf16=false")
    return "bfloat16"


def compute_dtype() -> str:
    """dtype of log-probabilities, entropies, values, rewards and losses: always ``float32``."""
    return "float32"


# ---------------------------------------------------------------------------- MFU

PEAK_TFLOPS_BF16: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIE", 756.0),
    ("H100", 989.0),      # SXM (reported as e.g. "NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
)
"""Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by GPU model, from the vendors' data sheets.
Checked in order against the upper-cased CUDA device name: the first entry whose words all occur
in it wins (so "H100 PCIe" before "H100", "L40S" before "L40" before "L4")."""


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """Dense bf16 peak of a GPU from its name (``PEAK_TFLOPS_BF16``); ``override`` (> 0) wins.
    None when the name matches no entry (the caller reports MFU as unknown)."""
    if override is not None:
        if not override > 0 or override != override or override == float("inf"):
            raise AcceleratorError(f"peak TFLOP/s: {override} must be a finite number > 0")
        return float(override)
    name = device_name.upper()
    for key, tflops in PEAK_TFLOPS_BF16:
        if all(word in name for word in key.split()):
            return tflops
    return None


def train_flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): ``6 N + 12 L H S`` (the dense matmuls plus
    the attention score / value products, no recomputation)."""
    for name, v in (("n_params", n_params), ("n_layers", n_layers), ("hidden", hidden), ("seq_len", seq_len)):
        if v < 0:
            raise AcceleratorError(f"{name}: {v} must be >= 0")
    return 6.0 * n_params + 12.0 * n_layers * hidden * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops_per_gpu: float | None, num_gpus: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over ``num_gpus x peak``; None without a peak."""
    if peak_tflops_per_gpu is None:
        return None
    if num_gpus < 1 or not peak_tflops_per_gpu > 0:
        raise AcceleratorError(f"mfu: num_gpus {num_gpus} must be >= 1 and peak {peak_tflops_per_gpu} > 0")
    return tokens_per_s * flops_per_token / (num_gpus * peak_tflops_per_gpu * 1e12)


def matmul_peak_tflops(dtype: str = "bfloat16", n: int = 1024, repeats: int = 5, device: str = "cpu") -> float:
    """This device's dense matmul throughput (TFLOP/s): the best of ``repeats`` timed ``n x n`` by
    ``n x n`` products in ``dtype`` with the current torch threads, after one warm-up. The CPU's
    MFU denominator (2 threads of the 2-core CI machine: about 0.18 bf16, 0.079 fp32)."""
    import time

    import torch

    if n < 1 or repeats < 1:
        raise AcceleratorError(f"matmul probe: n {n} and repeats {repeats} must be >= 1")
    a = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    b = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best / 1e12


def job_peak_tflops(override: float | None, gpu_run: bool, bf16: bool, cpu_threads: int | None = None) -> float | None:
    """The whole job's peak for ``perf/mfu`` (TFLOP/s): ``override`` (``trainer.peak_tflops``) when
    set; on a GPU run the driver's GPU model (``peak_tflops``) times the GPUs Ray reports, or None
    when the driver sees no GPU (then set the override); on a CPU run a matmul probe
    (``matmul_peak_tflops``) in the training precision with ``cpu_threads`` (default: every core)."""
    if override is not None:
        return peak_tflops("", override)
    if gpu_run:
        import torch

        if not torch.cuda.is_available():
            return None
        import ray

        per = peak_tflops(torch.cuda.get_device_name(0))
        n = float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 1.0
        return per * max(n, 1.0) if per is not None else None
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(cpu_threads or os.cpu_count() or 1)
    try:
        return matmul_peak_tflops("bfloat16" if bf16 else "float32", n=1024, repeats=3)
    finally:
        torch.set_num_threads(before)


def current_env() -> dict[str, str]:
    """``os.environ`` as a plain dict (what the pure functions take)."""
    return dict(os.environ)


def attn_implementation(bf16: bool) -> str | None:
    """Attention kernel of every transformers policy model (the rollout engine, the actor engine, the
    reference): ``eager`` in bf16, where SDPA takes a different kernel for the rollout's KV-cache
    decode than for the trainer's full forward and their logprobs disagree (k3 1.7e-3 on the real
    model; eager gives identical logprobs, ``docs/precision.md``); None (transformers' default) in fp32."""
    return "eager" if bf16 else None
