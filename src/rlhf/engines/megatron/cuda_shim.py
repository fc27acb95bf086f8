"""The CUDA shim that lets megatron-core 0.16.1 run on a CPU-only host (gloo, tests, CI).

megatron-core assumes a GPU in a few places that our engine reaches even on CPU. ``apply()``
replaces exactly those, and nothing else, and only when ``torch.cuda.is_available()`` is False;
on a GPU host it does nothing. It is called by ``MegatronEngine.__init__`` alone, i.e. inside the
process that owns the engine (a Ray worker or a test's spawned rank), never at import time of any
module. Each patch, with the call site it bypasses (paths relative to ``megatron/core``):

1. ``torch.cuda.current_device`` -> the CPU device. Used as ``device=`` in ~100 places; the first
   ones the engine reaches: ``models/common/embeddings/rotary_pos_embedding.py:162`` (moves
   ``inv_freq``), ``tensor_parallel/layers.py`` and ``tensor_parallel/cross_entropy.py`` helpers.
2. The "CUDA" RNG of ``tensor_parallel/random.py`` (``torch.cuda.get_rng_state``,
   ``torch.cuda.random.get_rng_state``, ``torch.cuda.manual_seed`` and the module's own
   ``_set_cuda_rng_state``; first failure ``random.py:235`` in ``CudaRNGStatesTracker.add`` via
   ``model_parallel_cuda_manual_seed``) -> one private CPU ``torch.Generator`` standing in for the
   GPU generator. The process's default CPU generator is never touched, so CPU results do not
   depend on the shim.
3. ``torch.cuda.synchronize`` -> no-op (``pipeline_parallel/p2p_communication.py:242`` with
   variable sequence lengths and ``:398`` after ``batch_isend_irecv``).
4. ``torch.Tensor.cuda`` -> returns the tensor itself
   (``models/common/language_module/language_module.py:244``: tied embeddings with PP > 1 move the
   shared weight to the GPU before the embedding-group all-reduce).
5. ``pipeline_parallel/schedules.py`` allocates ``torch.zeros([], device="cuda")`` (token counters
   at ``:596``, ``:983``, ``:2138``, reached even at PP=1 through ``get_forward_backward_func``) ->
   that module's ``torch`` name is rebound to a proxy of ``torch`` whose tensor factories map
   ``device="cuda"`` to the CPU. Only that module sees the proxy.

Bypassed without a patch, by how the engine calls megatron: the default causal mask built with
``device="cuda"`` (``transformer/utils.py:35``) -- the engine always passes an explicit
``[b, 1, s, s]`` mask; Megatron's own optimizer / grad clipping (``optimizer/optimizer.py``,
``optimizer/clip_grads.py``, ``Tensor.type()`` checks) -- the engine uses a torch optimizer and its
own gradient reductions; fused kernels -- the engine keeps every fusion flag off.
"""

from __future__ import annotations

import types

import torch

PATCHES = (
    "torch.cuda.current_device",
    "torch.cuda.get_rng_state / torch.cuda.random.get_rng_state / torch.cuda.manual_seed",
    "megatron.core.tensor_parallel.random._set_cuda_rng_state",
    "torch.cuda.synchronize",
    "torch.Tensor.cuda",
    "megatron.core.pipeline_parallel.schedules.torch (zeros/ones/empty/full/tensor with device='cuda')",
)
"""What ``apply()`` replaces on a CPU-only host, one entry per patch (see the module docstring)."""

_applied = False
_fake_cuda_generator: torch.Generator | None = None


def applied() -> bool:
    """Whether ``apply()`` patched this process."""
    return _applied


def _cpu_device(*_args, **_kwargs) -> torch.device:
    return torch.device("cpu")


def _get_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return _fake_cuda_generator.get_state()


def _set_rng_state(new_state: torch.Tensor, *_args, **_kwargs) -> None:
    _fake_cuda_generator.set_state(new_state)


def _manual_seed(seed: int) -> None:
    _fake_cuda_generator.manual_seed(int(seed))


def _noop(*_args, **_kwargs) -> None:
    return None


def _tensor_cuda(self, *_args, **_kwargs):
    return self


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by ``pipeline_parallel/schedules.py``: factories put "cuda" tensors on the CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor")

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name in self._FACTORIES:
            def factory(*args, _f=value, **kwargs):
                dev = kwargs.get("device")
                if dev is not None and torch.device(dev).type == "cuda":
                    kwargs["device"] = "cpu"
                return _f(*args, **kwargs)
            return factory
        return value


def apply() -> bool:
    """Patch this process for megatron-core on CPU; a no-op when CUDA is available or already applied.

    Returns True when the shim is active in this process.
    """
    global _applied, _fake_cuda_generator
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom

    _fake_cuda_generator = torch.Generator(device="cpu")
    torch.cuda.current_device = _cpu_device
    torch.cuda.get_rng_state = _get_rng_state
    torch.cuda.random.get_rng_state = _get_rng_state
    torch.cuda.manual_seed = _manual_seed
    mrandom._set_cuda_rng_state = _set_rng_state
    torch.cuda.synchronize = _noop
    torch.Tensor.cuda = _tensor_cuda
    schedules.torch = _CpuTorch()
    _applied = True
    return True
