"""Actor -> rollout engine weight sync, owned by the rollout side: the trainer calls
``WeightSync.sync(actors, rollout)`` and never sees the transport.

Transports (``rollout.weight_sync``, resolved by ``rlhf.config.weight_sync_mode``):

- ``reload`` (colocated, the CPU default): every actor rank consumes its engine's
  ``export_weights()`` (collective: ZeRO-3 gathers, megatron TP / PP gathers); rank 0 returns the
  full HF-named tensors, which reach the rollout worker through Ray's object store (the driver
  passes the ref on, never the weights).
- ``broadcast`` (vLLM placed apart): a gloo / NCCL group actor rank 0 -> every vLLM worker
  (backend from ``rlhf.engines.accelerator.weight_sync_backend``), opened once in ``open``; each
  sync streams the exported tensors one at a time, so the full model is never held twice.

The actor-side steps are small picklable callables (``Collect``, ``Specs``, ``OpenSender``,
``Broadcast``) run inside the actor process by ``ActorWorker.export_to(step)``; the worker itself
knows no transport. A new transport (CUDA IPC, say) is one more mode here.
"""

from __future__ import annotations

from dataclasses import dataclass

_SENDER: dict = {}
"""Per actor process: the open broadcast group of this process's rank 0 (``OpenSender``)."""


class Collect:
    """Reload: the full weights on rank 0 (None elsewhere); every rank joins the gathers."""

    def __call__(self, engine):
        sd = dict(engine.export_weights())
        return sd if engine.rank == 0 else None


class Specs:
    """Name, dtype and full shape of every exported tensor, in broadcast order (collective)."""

    def __call__(self, engine):
        from rlhf.engines.vllm_weight_sync import weight_specs

        return weight_specs(engine.export_weights())


@dataclass
class OpenSender:
    """Rank 0 hosts and joins the broadcast group to the vLLM workers (blocks until all joined)."""

    host: str
    port: int
    world_size: int
    backend: str

    def __call__(self, engine):
        from rlhf.engines import vllm_weight_sync as ws

        _SENDER["group"] = ws.open_group(self.host, self.port, 0, self.world_size, self.backend)
        return 0


class Broadcast:
    """Every rank joins each gather in turn; rank 0 broadcasts each tensor as it comes. Returns the
    bytes sent (0 off rank 0)."""

    def __call__(self, engine):
        import torch

        from rlhf.engines import vllm_weight_sync as ws
        from rlhf.engines.accelerator import model_device

        params = engine.export_weights()
        if engine.rank != 0:
            for _ in params:  # join every gather
                pass
            return 0
        return ws.broadcast_weights(_SENDER["group"], params, model_device(torch.cuda.is_available()))


@dataclass
class WeightSync:
    """How new actor weights reach the rollout engine in one run."""

    mode: str
    """``reload`` or ``broadcast``."""
    specs: list | None = None
    """Broadcast order (``WeightSpec`` list); None for ``reload``."""

    @classmethod
    def open(cls, cfg, actors: list, rollout) -> "WeightSync":
        """Resolve the transport of ``cfg`` and, for a broadcast, build the group (collective over
        the actor ranks and the rollout's vLLM workers)."""
        import ray

        from rlhf.config import weight_sync_mode
        from rlhf.engines.accelerator import weight_sync_backend

        mode = weight_sync_mode(cfg)
        if mode != "broadcast":
            return cls(mode)
        backend = weight_sync_backend(cfg.cluster.gpus_per_worker > 0, shares_gpu=bool(cfg.cluster.colocate))
        addr, port = ray.get(actors[0].address.remote())
        world = ray.get(rollout.sync_world_size.remote())
        ray.get([actors[0].export_to.remote(OpenSender(addr, port, world, backend)),
                 rollout.init_weight_sync.remote(addr, port, backend)])
        specs = ray.get([a.export_to.remote(Specs()) for a in actors])[0]
        return cls(mode, specs)

    def sync(self, actors: list, rollout) -> None:
        """Push the actors' current weights to ``rollout``; raises as soon as any rank fails."""
        from rlhf.trainer import fetch

        if self.mode == "broadcast":
            fetch([a.export_to.remote(Broadcast()) for a in actors] + [rollout.receive_weights.remote(self.specs)])
            return
        refs = [a.export_to.remote(Collect()) for a in actors]  # every rank joins; rank 0 returns them
        fetch(refs[1:] + [rollout.update_weights.remote(refs[0])])  # the rollout worker resolves the ref itself
