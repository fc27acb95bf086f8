"""DeepSpeed training engine (ZeRO 0-3; gloo on CPU, nccl on GPU) behind ``rlhf.engines.base.TrainingEngine``.

``DeepSpeedTrainEngine.from_pretrained(model_dir, role, settings, args)`` builds it from a Hugging Face
checkpoint (``policy``: causal LM; ``critic``: ``AutoModelForSequenceClassification(num_labels=1)`` read
per token) and owns the Hugging Face forward: ``forward(batch)`` gives per-token ``logp`` / ``entropy``
or ``values`` of the workers' batch layout (``rlhf.workers.batch``), ``forward_backward(batch, loss_fn)``
micro-batches it, ``step()`` is the accumulation boundary. ``DeepSpeedTrainEngine(model, spec)`` wraps
an already built model: ``rlhf sft`` (a causal LM, LoRA-wrapped or not) and ``rlhf rm`` (a
sequence-score model) train through it with their own forward, ``backward`` and ``step``, and save with
``save_pretrained``: this class is the one DeepSpeed setup of the project (config, optimizer, schedule).

One instance per data-parallel rank, created inside a Ray worker (or a launched ``rlhf sft`` / ``rlhf rm``
process) after the process group env (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``) is set. The optimizer is torch AdamW (fused) handed to DeepSpeed as a client optimizer
(no JIT op builds); the learning rate follows ``warmup_factor`` (linear warm-up, then constant);
gradient clipping is DeepSpeed's. Gradient accumulation is DeepSpeed's: ``backward`` never rescales
the loss (the PPO losses are already normalised by the global token count; ``rlhf sft`` / ``rlhf rm``
divide their micro-batch means by ``grad_accum``), ``step`` only updates at the accumulation boundary.

State files are loaded without pickle code execution: ``safe_load`` is ``torch.load(weights_only=
True)`` with an allowlist of the three DeepSpeed classes its checkpoints hold (``SAFE_GLOBALS``),
and ``load_state`` routes DeepSpeed's own loads through it (DeepSpeed itself passes
``weights_only=False``).
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from rlhf.engines.accelerator import attn_implementation
from rlhf.engines.base import EngineArgs
from rlhf.workers.batch import RolloutBatch, ScoredBatch, forward_in_micro_batches, token_budget_micro_batches


@dataclass(frozen=True)
class EngineSpec(EngineArgs):
    """How to build one DeepSpeed engine: the backend-neutral ``EngineArgs`` plus the
    ``deepspeed`` section's settings."""

    zero_stage: int = 0
    """ZeRO stage 0-3."""
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


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The one learning-rate schedule (PPO actor and critic, ``rlhf sft``, ``rlhf rm``): the multiplier of
    the peak LR at optimizer step ``step`` (0-based) is ``min(1, (step + 1) / warmup_steps)``, or 1 when
    ``warmup_steps`` is 0. The first step runs at ``lr / warmup_steps``; step ``warmup_steps - 1`` and
    every later one at ``lr``."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


PORT_RANGE = (20000, 32768)
"""Where rendezvous ports are drawn: below Linux's ephemeral range (32768-60999), whose ports the
kernel hands to outgoing connections (Ray's, gloo's) at any moment, so that a port found free is
not taken by a connection before the process group listens on it (seen: EADDRINUSE when several
runs start on one machine)."""


def free_port(host: str = "127.0.0.1", tries: int = 64) -> int:
    """A TCP port free on ``host`` now: a random one of ``PORT_RANGE`` that binds, else the kernel's
    pick. Still a check, not a reservation: the process group must listen soon after."""
    import random

    rng = random.SystemRandom()
    for _ in range(tries):
        port = rng.randrange(*PORT_RANGE)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
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
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    from rlhf.engines.accelerator import dist_backend, ds_accelerator

    accel = ds_accelerator(torch.cuda.is_available(), os.environ)
    if accel == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(dist_backend(accel))
    return True


def load_hf_model(model_dir: str | Path, role: str, dtype: torch.dtype = torch.float32, attn: str | None = None,
                  seed: int | None = None) -> torch.nn.Module:
    """The Hugging Face model of a role: ``policy`` a causal LM, ``critic`` (and reward) a
    sequence-classification model with one label; ``seed`` seeds torch first (a missing ``score``
    head is initialised from it)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kw = {"dtype": dtype}
    if attn is not None:
        kw["attn_implementation"] = attn
    if seed is not None:
        torch.manual_seed(seed)
    if role == "policy":
        return AutoModelForCausalLM.from_pretrained(str(model_dir), **kw)
    if role == "critic":
        return AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1, **kw)
    raise ValueError(f"role: {role!r} is not 'policy' or 'critic'")


# ----------------------------------------------------------------------------- the HF forward

def _forward_hidden_or_logits(model, batch: RolloutBatch, **kw):
    dev = next(model.parameters()).device
    return model(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                 position_ids=batch.position_ids.to(dev), use_cache=False, **kw)


def _keeps_logits(model) -> bool:
    """Whether the causal LM's forward takes ``logits_to_keep`` (transformers' LM head on the last
    k positions only); looked up once per model class."""
    return _class_keeps_logits(type(model))


@functools.lru_cache(maxsize=None)
def _class_keeps_logits(cls) -> bool:
    import inspect

    fwd = getattr(cls, "forward", None)
    try:
        return fwd is not None and "logits_to_keep" in inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        return False


def policy_logits(model, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    """Logits ``[B, T, V]`` that predict each response token (divided by the sampling temperature).
    The LM head runs on the T+1 last positions only (``logits_to_keep``; response tokens start at
    column P for every row), not on the prompt: the same values with less work (a vocab-sized
    matmul per prompt token saved, forward and backward)."""
    T = batch.mask.shape[1]
    if _keeps_logits(model):
        logits = _forward_hidden_or_logits(model, batch, logits_to_keep=T + 1).logits[:, :T]
    else:
        logits = batch.response_slice(_forward_hidden_or_logits(model, batch).logits)
    return logits.float() / temperature


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The sampler's top-k then top-p filtering (filtered logits set to -inf), as transformers'
    warpers apply it after the temperature: the trainer-side twin of the processed rollout logprobs."""
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= (1 - top_p)
        drop[..., -1:] = False  # keep at least the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def critic_values(model, batch: RolloutBatch) -> torch.Tensor:
    """Values ``[B, T]``: V_t is read at the state that predicts response token t (same positions
    as the policy's logits, so the value mask is the response mask, unshifted)."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = _forward_hidden_or_logits(backbone, batch).last_hidden_state
    return model.score(batch.response_slice(hidden)).squeeze(-1).float()


class DeepSpeedTrainEngine:
    """A model wrapped by DeepSpeed; implements ``rlhf.engines.base.TrainingEngine``.

    ``role`` (``policy`` or ``critic``) and ``temperature`` (> 0, divides the policy's logits) choose what
    ``forward`` / ``forward_backward`` compute; a model built by the caller for other uses (SFT, RM)
    keeps the raw ``forward(*args, **kwargs)`` through ``self.engine``."""

    def __init__(self, model: torch.nn.Module, spec: EngineSpec, role: str = "policy", temperature: float = 1.0):
        import deepspeed

        init_distributed()
        self.spec, self.role, self.temperature = spec, role, float(temperature)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=spec.lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay,
                                fused=True)  # one kernel per tensor, CPU and GPU (half the step time here)
        warm = max(spec.warmup_steps, 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_factor(s, warm))
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
        self.dp_rank, self.dp_size = self.rank, world  # pure data parallelism
        self._pending = False

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, role: str, settings, args) -> "DeepSpeedTrainEngine":
        """Build from a Hugging Face checkpoint: ``settings`` is the ``deepspeed`` config section
        (``zero_stage``, ``bf16``), ``args`` the backend-neutral ``rlhf.engines.base.EngineArgs``.
        fp32 weights (DeepSpeed casts to bf16 itself); a bf16 policy uses eager attention."""
        spec = EngineSpec(**{**asdict(args), "betas": tuple(args.betas)}, zero_stage=settings.zero_stage,
                          bf16=settings.bf16)
        attn = attn_implementation(settings.bf16) if role == "policy" else None
        model = load_hf_model(model_dir, role, torch.float32, attn, seed=args.seed if role == "critic" else None)
        return cls(model, spec, role=role, temperature=args.temperature)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    # ------------------------------------------------------------------ the HF forward

    def _outputs(self, batch: RolloutBatch, top_k: int = 0, top_p: float = 1.0) -> dict[str, torch.Tensor]:
        if self.role == "critic":
            return {"values": critic_values(self.module, batch)}
        from rlhf.algo import entropy_from_logits, logprobs_from_logits

        logits = policy_logits(self.module, batch, self.temperature)
        responses = batch.responses.to(logits.device)
        out = {"logp": logprobs_from_logits(logits, responses)}
        with torch.no_grad():  # statistics, never differentiated
            out["entropy"] = entropy_from_logits(logits)
            if top_k or top_p < 1.0:
                out["logp_filtered"] = logprobs_from_logits(filter_logits(logits, top_k, top_p), responses)
        return out

    def _micro_rows(self, batch: RolloutBatch, rows_per_group: int | None) -> list[list[int]]:
        """The row groups one call runs: ``rows_per_group`` rows each (``None``: all rows at once),
        or, with ``spec.max_tokens_per_micro_batch``, token-budget groups of trimmed rows; then every
        data-parallel rank runs as many groups as the rank that needs the most (ZeRO's collectives
        run per micro-batch), a rank with too few rows filling in empty groups."""
        B, budget = batch.num_rows, self.spec.max_tokens_per_micro_batch
        if not budget:
            step = rows_per_group or max(B, 1)
            return [list(range(s, min(s + step, B))) for s in range(0, B, step)]
        p_len, r_len = batch.row_lengths()
        groups = token_budget_micro_batches(p_len.tolist(), r_len.tolist(), budget)
        if self.world_size > 1:
            import torch.distributed as dist

            n = torch.tensor([len(groups)], dtype=torch.long)
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            groups = token_budget_micro_batches(p_len.tolist(), r_len.tolist(), budget, parts=int(n))
            groups += [[] for _ in range(int(n) - len(groups))]
        return groups

    @torch.no_grad()
    def forward(self, batch: RolloutBatch, top_k: int = 0, top_p: float = 1.0) -> dict[str, torch.Tensor]:
        """``{"logp", "entropy"}`` (policy) or ``{"values"}`` (critic), ``[B, T]`` float32 on the CPU, from
        one forward over the whole batch, or over token-budget micro-batches of trimmed rows with
        ``spec.max_tokens_per_micro_batch`` (values at ``mask == 0`` are unspecified). A policy given
        ``top_k`` / ``top_p`` also returns ``logp_filtered``: the logprobs after the sampler's filtering."""
        self.engine.train(False)
        if self.spec.max_tokens_per_micro_batch:
            dev = self.module.device
            return forward_in_micro_batches(batch, self._micro_rows(batch, None),
                                            lambda sub: self._outputs(sub.to(dev), top_k, top_p))
        return {k: v.cpu() for k, v in self._outputs(batch, top_k, top_p).items()}

    def forward_backward(self, batch: ScoredBatch, loss_fn: Callable) -> list[dict[str, float]]:
        """Accumulate gradients of ``loss_fn(outputs, sub_batch) -> (loss, stats)`` over micro-batches of
        ``spec.micro_batch_size`` rows; the loss is back-propagated as given (never rescaled). The rows
        of one call are one optimizer step's share of this rank (``grad_accum`` micro-batches): the
        following ``step()`` is DeepSpeed's accumulation boundary. Returns one record per micro-batch
        (stats as floats plus ``loss``); raises ``FloatingPointError`` on a non-finite loss."""
        self.engine.train(True)
        budget = self.spec.max_tokens_per_micro_batch
        groups = self._micro_rows(batch, self.spec.micro_batch_size)
        out: list[dict[str, float]] = []
        for i, rows in enumerate(groups):
            if self._pending:  # the previous micro-batch's DeepSpeed step (never the boundary here)
                self.engine.step()
                self._pending = False
            if budget:  # as many micro-batches as the groups: the last one is the accumulation boundary
                self.engine.set_gradient_accumulation_boundary(i == len(groups) - 1)
            sub = batch.select_rows(rows or [0])
            sub = (sub.trimmed() if budget else sub).to(self.module.device)
            loss, stats = loss_fn(self._outputs(sub), sub)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} (rank {self.rank})")
            if not rows:  # an empty group: a zero-weight pass that keeps this rank's collectives in step
                loss = loss * 0.0
            self.engine.backward(loss, scale_wrt_gas=False)
            self._pending = True
            if not rows:
                continue
            rec = {k: float(v) for k, v in stats.items()}
            rec["loss"] = float(loss.detach())
            out.append(rec)
        return out

    def backward(self, loss: torch.Tensor) -> None:
        """Raw DeepSpeed backward (callers that run their own forward: SFT, RM, the engine tests)."""
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> dict[str, float]:
        """Advance one micro-batch (after ``forward_backward``: its last one); at the accumulation
        boundary also returns grad_norm and lr, else ``{}``."""
        self._pending = False
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

    def export_weights(self, trainable_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full CPU tensor copy) of every parameter (``trainable_only``: of those with
        ``requires_grad``), one at a time (ZeRO-3 gathers each in turn: collective, every rank must
        consume the iterator)."""
        import deepspeed

        for name, p in self.module.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            with deepspeed.zero.GatheredParameters([p], enabled=self.spec.zero_stage == 3):
                yield name, p.detach().to("cpu", copy=True)

    named_full_parameters = export_weights

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers, unsharded, keyed like the Hugging Face model's own state dict."""
        sd = dict(self.export_weights())
        first = {id(p): n for n, p in self.module.named_parameters()}
        for name, p in self.module.named_parameters(remove_duplicate=False):  # tied names (lm_head = embed):
            if name not in sd:  # a copy of the gathered tensor (ZeRO-3's own is an empty partition)
                sd[name] = sd[first[id(p)]].clone()
        for name, t in self.module.state_dict().items():  # persistent buffers (no parameter is missing)
            if name not in sd and name.rsplit(".", 1)[-1] not in ("inv_freq",):
                sd.setdefault(name, t.detach().to("cpu", copy=True))
        return sd

    def save_pretrained(self, out_dir: str | Path, trainable_only: bool = False) -> None:
        """Hugging Face checkpoint (safetensors); every rank must call it (ZeRO-3 gathers), rank 0 writes.
        ``trainable_only`` gathers only the trained parameters (a peft model then writes its adapter)."""
        sd = dict(self.export_weights(trainable_only=True)) if trainable_only else self.full_state_dict()
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

    def destroy(self, group: bool = True) -> None:
        """Free the DeepSpeed engine, forget DeepSpeed's cached groups and destroy the process group
        (``group=False`` keeps it: a caller that did not create it)."""
        import torch.distributed as dist

        try:
            self.engine.destroy()
        finally:
            if group and dist.is_initialized():
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
