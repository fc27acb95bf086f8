"""DeepSpeed training engine (ZeRO 0-3; gloo on CPU, nccl on GPU) behind ``TrainingEngine``.

One instance per data-parallel rank, created inside a Ray worker after the process group env
(``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) is set. The optimizer
is torch AdamW (fused) handed to DeepSpeed as a client optimizer (no JIT op builds); the learning rate
warms up linearly then stays constant; gradient clipping is DeepSpeed's. Gradient accumulation
is DeepSpeed's: ``backward`` never rescales the loss (the PPO losses are already normalised by
the global token count), ``step`` only updates at the accumulation boundary.

State files are loaded without pickle code execution: ``safe_load`` is ``torch.load(weights_only=
True)`` with an allowlist of the three DeepSpeed classes its checkpoints hold (``SAFE_GLOBALS``),
and ``load_state`` routes DeepSpeed's own loads through it (DeepSpeed itself passes
``weights_only=False``).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch


@dataclass
class EngineSpec:
    """How to build one training engine."""

    lr: float
    """Peak learning rate."""
    warmup_steps: int = 0
    """Linear warmup (optimizer steps), then constant."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    zero_stage: int = 0
    """ZeRO stage 0-3."""
    micro_batch_size: int = 1
    """Sequences per forward on this rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on this rank."""
    bf16: bool = False
    """bf16 mixed precision (bf16 weights and activations, fp32 master weights and AdamW states;
    on CPU too, where bf16 matrix multiplies run several times faster than fp32 on CPUs with
    AVX512-BF16 / AMX)."""


SAFE_GLOBALS = ("deepspeed.runtime.zero.config:ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler:LossScaler",
                "deepspeed.utils.tensor_fragment:fragment_address")
"""The non-tensor classes DeepSpeed 0.19 writes into ZeRO 0-3 / bf16 state files (measured); any other
global in a state file is refused."""


def safe_load(path: str | Path, map_location="cpu"):
    """``torch.load`` of a DeepSpeed state file with ``weights_only=True`` and ``SAFE_GLOBALS``."""
    import importlib

    allowed = [getattr(importlib.import_module(m), n) for m, n in (g.split(":") for g in SAFE_GLOBALS)]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location=map_location, weights_only=True)


def first_non_finite(obj, where: str = "") -> str | None:
    """The path (``where.key[i]...``) of the first floating tensor in ``obj`` (nested dicts, lists,
    tuples) that holds NaN or inf, or ``None``."""
    if torch.is_tensor(obj):
        return where if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    if isinstance(obj, float):
        return None  # python floats (loss scales, lrs) are bookkeeping, checked by the engine itself
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        bad = first_non_finite(v, f"{where}.{k}" if where else str(k))
        if bad is not None:
            return bad
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> bool:
    """Join the process group the env describes (gloo on CPU, nccl on GPU), once per process.

    Launched ranks (Ray workers, torchrun) bring RANK / WORLD_SIZE / MASTER_*; a single process
    without a launcher gets RANK=0, WORLD_SIZE=1 and a free local port. Returns True when this
    call created the group (the caller then destroys it). Shared by the PPO engines, ``rlhf sft``
    and ``rlhf rm``.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


class DeepSpeedTrainEngine:
    """A model wrapped by DeepSpeed; implements ``rlhf.engines.base.TrainingEngine``."""

    def __init__(self, model: torch.nn.Module, spec: EngineSpec):
        import deepspeed

        init_distributed()
        self.spec = spec
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=spec.lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay,
                                fused=True)  # one kernel per tensor, CPU and GPU (half the step time here)
        warm = max(spec.warmup_steps, 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        ds_config = {
            "train_micro_batch_size_per_gpu": spec.micro_batch_size,
            "gradient_accumulation_steps": spec.grad_accum,
            "train_batch_size": spec.micro_batch_size * spec.grad_accum * world,
            "gradient_clipping": spec.grad_clip,
            "zero_optimization": {"stage": spec.zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": bool(spec.bf16)},
            "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
        self.world_size = world
        self.rank = int(os.environ.get("RANK", "0"))

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> dict[str, float]:
        """Advance one micro-batch; at the accumulation boundary also returns grad_norm and lr."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        own = None
        if boundary and self.spec.zero_stage == 0 and not self.spec.bf16:  # no DeepSpeed optimizer wrapper: no norm
            grads = [p.grad.detach().float().norm() for p in self.module.parameters() if p.grad is not None]
            own = float(torch.stack(grads).norm()) if grads else 0.0
        self.engine.step()
        if not boundary:
            return {}
        gn = self.engine.get_global_grad_norm()
        gn = float(gn.item() if torch.is_tensor(gn) else (gn if gn is not None else (own if own is not None
                                                                                      else float("nan"))))
        return {"grad_norm": gn, "lr": float(self.scheduler.get_last_lr()[0])}

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def named_full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter, unsharded (ZeRO-3 gathered), as a detached CPU float tensor copy."""
        import deepspeed

        for name, p in self.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], enabled=self.spec.zero_stage == 3):
                yield name, p.detach().to("cpu", copy=True)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers, unsharded, keyed like the Hugging Face model's own state dict."""
        sd = dict(self.named_full_parameters())
        for name, t in self.module.state_dict().items():  # persistent buffers (no parameter is missing)
            if name not in sd and name.rsplit(".", 1)[-1] not in ("inv_freq",):
                sd.setdefault(name, t.detach().to("cpu", copy=True))
        return sd

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Hugging Face checkpoint (safetensors); every rank must call it (ZeRO-3 gathers), rank 0 writes."""
        sd = self.full_state_dict()
        if self.rank == 0:
            self.module.save_pretrained(str(out_dir), state_dict=sd, safe_serialization=True)

    def save_state(self, out_dir: str | Path) -> None:
        """Engine state (weights, optimizer, scheduler) for exact resume; all ranks call it."""
        self.engine.save_checkpoint(str(out_dir), tag="state", save_latest=False)

    def load_state(self, in_dir: str | Path) -> None:
        """Restore ``save_state``'s files; every file is read by ``safe_load`` (no pickle code runs)."""
        ce = self.engine.checkpoint_engine
        ce.load = lambda path, map_location=None: safe_load(path, map_location)  # DeepSpeed's own: weights_only=False
        path, _ = self.engine.load_checkpoint(str(in_dir), tag="state")
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state under {in_dir}")

    def destroy(self) -> None:
        import torch.distributed as dist

        try:
            self.engine.destroy()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            _forget_deepspeed_groups()


def _forget_deepspeed_groups() -> None:
    """Drop DeepSpeed's cached process groups so a later engine in this process starts clean."""
    from deepspeed.utils import groups

    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP",
                 "_MODEL_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP"):
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        if isinstance(getattr(groups, name, None), dict):
            getattr(groups, name).clear()
