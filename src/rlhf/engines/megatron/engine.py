"""megatron-core training engine: a Llama / Qwen2 HF checkpoint as a ``GPTModel`` (local layer spec)
with tensor, pipeline and data parallelism, trained with torch AdamW.

One instance per rank, created in the process that owns it after the process-group env
(``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``) is set; ``WORLD_SIZE`` must be a multiple
of ``tensor_parallel x pipeline_parallel``, the rest is data parallelism. Ranks of one model-parallel
group (same ``dp_rank``) must be given the same rows. The engine joins the world group the env
describes (``rlhf.engines.deepspeed_engine.init_distributed``) and destroys it in ``destroy()`` only
when it created it; a process that builds several engines one after another should create the group
itself first (re-creating a gloo world group on the same ``MASTER_PORT`` hangs its next new_group).

Batches are the workers' records (``rlhf.workers.batch``: ``RolloutBatch`` to score, ``ScoredBatch`` to
train on): ``input_ids`` / ``attention_mask`` ``[B, P+T]`` with prompts left-padded to P and responses
right-padded to T, ``responses`` and ``mask`` ``[B, T]``, ``prompt_len`` = P, plus what the loss reads. RoPE in megatron-core ignores
``position_ids``, so the engine right-pads every row (shifts it left by its prompt padding) and reads
the outputs back at the response positions; the attention mask is explicit (causal + key padding).

Choices on CPU and GPU alike (stated, not hidden): the optimizer is torch AdamW (fused), not
megatron's (on CPU its grad clipping and distributed optimizer need process-wide ``Tensor.type``
patches). ``distributed_optimizer`` (default) shards the AdamW state over data-parallel ranks with our
own ZeRO-1 (``_DPShard``: each DP rank updates 1/dp of the flattened parameters, then all-gathers);
off, every DP rank holds the full state. Gradients are averaged over data-parallel ranks by one flat
all-reduce per step, tied embeddings under PP are summed over the embedding group, gradient clipping
is the global norm over all TP / PP shards (each tensor counted once), as DeepSpeed clips. ``bf16``
runs the forward under ``torch.autocast(bfloat16)`` with fp32 weights and optimizer states.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from rlhf.engines.megatron import cuda_shim
from rlhf.engines.megatron.hf_mapping import (ArchSpec, MegatronEngineError, SafetensorsReader, check_layout,
                                              hf_from_full, hf_names, hf_shape, megatron_local_tensor,
                                              megatron_name, read_arch, tp_partition_dim)
from rlhf.workers.batch import RolloutBatch, ScoredBatch

ROLES = ("policy", "critic")
STATE_VERSION = 1


@dataclass(frozen=True)
class RightPadded:
    """A batch in megatron's layout: every row shifted left by its prompt padding (``_prepare``)."""

    ids: torch.Tensor
    """``[B, s]`` int64: the real tokens of each row from column 0, 0 after them."""
    amask: torch.Tensor
    """``[B, 1, s, s]`` bool: the attention mask, True = masked (causal, or a padding key)."""
    pos: torch.Tensor
    """``[B, T]`` int64: the column whose output predicts response token j."""
    positions: torch.Tensor
    """``[B, s]`` int64: position ids 0 .. s-1."""

    def rows(self, rows: slice, device) -> "RightPadded":
        """The given rows, on ``device``."""
        return replace(self, **{f.name: getattr(self, f.name)[rows].to(device) for f in fields(self)})


class ValueHead(torch.nn.Module):
    """The critic's scalar head ``score`` (``Linear(hidden, 1, bias=False)``, replicated over TP), in the
    place of ``GPTModel.output_layer`` (same call signature: returns ``(values [s, b, 1], None)``)."""

    def __init__(self, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(1, hidden, dtype=dtype))
        self.weight.tensor_model_parallel = False

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        return F.linear(hidden_states, self.weight), None


def _setting(settings, name: str, default):
    return getattr(settings, name, default) if settings is not None else default


class MegatronEngine:
    """One rank of a megatron-core model built from a Hugging Face checkpoint.

    Args:
        model_dir: HF checkpoint directory (config.json + safetensors), Llama or Qwen2.
        role: ``"policy"`` (causal LM: logprobs / entropy) or ``"critic"`` (values from a ``score``
            head, named like ``AutoModelForSequenceClassification(num_labels=1)``).
        settings: a ``rlhf.config.MegatronConfig``-like object: ``tensor_parallel`` (>= 1),
            ``pipeline_parallel`` (>= 1), ``distributed_optimizer`` (shard AdamW states over DP ranks),
            ``recompute`` (full activation recompute, one layer at a time), ``bf16`` (autocast).
            None: all defaults (1, 1, True, False, False).
        lr: peak learning rate (> 0); linear warm-up over ``warmup_steps`` optimizer steps, then constant.
        warmup_steps: >= 0.
        weight_decay, betas: AdamW.
        grad_clip: global gradient-norm clip (> 0; None or 0: no clipping).
        micro_batch_size: rows per forward in ``forward_backward`` / ``logprobs`` / ``values`` (>= 1).
        seed: seeds megatron's RNG tracker and a missing critic head (as ``torch.manual_seed(seed)``
            would make transformers initialise it).
        temperature: the logits are divided by it before logprobs / entropy (> 0), as the trainer does.
    """

    def __init__(self, model_dir: str | Path, role: str, settings=None, *, lr: float, warmup_steps: int = 0,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95), grad_clip: float | None = 1.0,
                 micro_batch_size: int = 1, seed: int = 0, temperature: float = 1.0):
        if role not in ROLES:
            raise MegatronEngineError(f"role: {role!r} is not one of {ROLES}")
        if micro_batch_size < 1:
            raise MegatronEngineError(f"micro_batch_size: {micro_batch_size} must be >= 1")
        if not temperature > 0:
            raise MegatronEngineError(f"temperature: {temperature} must be > 0")
        self.model_dir = Path(model_dir)
        self.role = role
        self.spec: ArchSpec = read_arch(self.model_dir)
        self.tp = int(_setting(settings, "tensor_parallel", 1))
        self.pp = int(_setting(settings, "pipeline_parallel", 1))
        self.distributed_optimizer = bool(_setting(settings, "distributed_optimizer", True))
        self.recompute = bool(_setting(settings, "recompute", False))
        self.bf16 = bool(_setting(settings, "bf16", False))
        check_layout(self.spec, self.tp, self.pp)
        self.micro_batch_size = int(micro_batch_size)
        self.temperature = float(temperature)
        self.grad_clip = grad_clip
        self.seed = int(seed)

        from rlhf.engines.deepspeed_engine import init_distributed

        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self._own_group = init_distributed()
        world = dist.get_world_size()
        if world % (self.tp * self.pp):
            raise MegatronEngineError(f"megatron.tensor_parallel x pipeline_parallel = {self.tp * self.pp} must "
                                      f"divide the role's world size {world}")
        cuda_shim.apply()
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                                     create_gloo_process_groups=False)  # only megatron's own optimizer uses them
        tensor_parallel.model_parallel_cuda_manual_seed(self.seed)
        self.ps = ps
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.rank, self.world_size = dist.get_rank(), world
        self.tp_rank, self.pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.first_stage, self.last_stage = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()

        self.model = self._build_model()
        self._load_hf()
        self.model.to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self._shard = _DPShard(self.params, self.dp_rank, self.dp_size, self.ps.get_data_parallel_group()) \
            if self.distributed_optimizer and self.dp_size > 1 else None
        opt_params = [self._shard.master] if self._shard is not None else self.params
        self._opt_names = ["dp_shard"] if self._shard is not None else \
            [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(opt_params, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                           fused=True)
        warm = max(int(warmup_steps), 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)
        self.steps = 0
        self._reduced = False

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, role: str, settings, args) -> "MegatronEngine":
        """``rlhf.engines.base.TrainingEngine``'s constructor: ``settings`` is the ``megatron`` config
        section, ``args`` the backend-neutral ``EngineArgs`` (``grad_accum`` is not used: one
        ``forward_backward`` call accumulates all its micro-batches)."""
        return cls(model_dir, role, settings, lr=args.lr, warmup_steps=args.warmup_steps,
                   weight_decay=args.weight_decay, betas=tuple(args.betas), grad_clip=args.grad_clip,
                   micro_batch_size=args.micro_batch_size, seed=args.seed, temperature=args.temperature)

    filtered_logprobs = False
    """``forward`` cannot give top-k / top-p filtered logprobs (the full logits are never gathered)."""

    @property
    def model_parallel_group(self):
        """The TP x PP group of this rank (ranks that compute the same rows together); None without
        model parallelism."""
        return self.ps.get_model_parallel_group() if self.tp * self.pp > 1 else None

    @property
    def module(self) -> torch.nn.Module:
        """This rank's megatron ``GPTModel`` (its TP shard of its PP stage)."""
        return self.model

    # ------------------------------------------------------------------ build and load

    def _transformer_config(self):
        from megatron.core.transformer.transformer_config import TransformerConfig

        s = self.spec
        kw = {}
        if self.recompute:
            kw = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        return TransformerConfig(
            num_layers=s.num_layers, hidden_size=s.hidden_size, num_attention_heads=s.num_heads,
            num_query_groups=s.num_kv_heads, kv_channels=s.head_dim, ffn_hidden_size=s.ffn_size,
            tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
            use_cpu_initialization=True, perform_initialization=False, params_dtype=torch.float32,
            pipeline_dtype=torch.bfloat16 if self.bf16 else torch.float32,
            hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm", layernorm_epsilon=s.rms_eps,
            gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=s.qkv_bias,
            gradient_accumulation_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
            bias_activation_fusion=False, bias_dropout_fusion=False, persist_layer_norm=False,
            attention_softmax_in_fp32=True, variable_seq_lengths=True, moe_token_dispatcher_type="alltoall",
            calculate_per_token_loss=True, **kw)

    def _build_model(self):
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        s = self.spec
        model = GPTModel(self._transformer_config(), get_gpt_layer_local_spec(normalization="RMSNorm"),
                         vocab_size=s.vocab_size, max_sequence_length=s.max_positions,
                         pre_process=self.first_stage, post_process=self.last_stage, parallel_output=True,
                         share_embeddings_and_output_weights=s.tied and self.role == "policy",
                         position_embedding_type="rope", rotary_base=s.rope_theta)
        if self.role == "critic" and self.last_stage:
            model.output_layer = ValueHead(s.hidden_size, torch.float32)
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

        for name, p in model.named_parameters():  # not set by megatron when perform_initialization=False
            if not hasattr(p, "tensor_model_parallel"):
                dim = tp_partition_dim(name, self.role)
                set_tensor_model_parallel_attributes(p, dim is not None, 0 if dim is None else dim, 1)
        return model

    def _score_init(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return torch.empty(1, self.spec.hidden_size).normal_(0.0, self.spec.initializer_range, generator=g)

    def _load_hf(self) -> None:
        reader = SafetensorsReader(self.model_dir)
        offset = self.pp_rank * (self.spec.num_layers // self.pp)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                t = megatron_local_tensor(self.spec, reader, name, self.role, self.tp, self.tp_rank, offset,
                                          self._score_init)
                if tuple(t.shape) != tuple(p.shape):
                    raise MegatronEngineError(f"{self.model_dir}: tensor for {name} has shape {tuple(t.shape)}, "
                                              f"the model expects {tuple(p.shape)}")
                p.copy_(t.to(p.dtype))

    # ------------------------------------------------------------------ batches

    def _prepare(self, batch: RolloutBatch) -> RightPadded:
        """Right-padded ids, the explicit attention mask and the position of each response prediction."""
        ids, attn = batch.input_ids.cpu(), batch.attention_mask.cpu().bool()
        B, S = ids.shape
        P, T = int(batch.prompt_len), int(batch.mask.shape[1])
        left = (attn.long().cumsum(1) == 0).sum(1)                      # prompt padding per row
        cols = torch.arange(S).unsqueeze(0) + left.unsqueeze(1)
        inside = cols < S
        cols = cols.clamp(max=S - 1)
        valid = attn.gather(1, cols) & inside
        rp_ids = torch.where(valid, ids.gather(1, cols), torch.zeros_like(ids))
        s_eff = max(int(valid.sum(1).max()), 1)
        rp_ids, valid = rp_ids[:, :s_eff], valid[:, :s_eff]
        causal = torch.ones(s_eff, s_eff, dtype=torch.bool).triu(1)
        amask = (causal.unsqueeze(0) | ~valid.unsqueeze(1)).unsqueeze(1)  # [B, 1, s, s], True = masked
        pos = (P - 1 - left).unsqueeze(1) + torch.arange(T).unsqueeze(0)  # predicts response token j
        pos = pos.clamp(min=0, max=s_eff - 1)
        return RightPadded(ids=rp_ids, amask=amask, pos=pos, positions=torch.arange(s_eff).expand(B, s_eff))

    def _micro_batches(self, batch: RolloutBatch, mb: int) -> list[tuple[RolloutBatch, RightPadded]]:
        """(rows of ``batch``, their ``_prepare`` tensors) per micro-batch of ``mb`` rows, on the device."""
        prep = self._prepare(batch)
        B = prep.ids.shape[0]
        out = []
        for i in range(0, B, mb):
            rows = slice(i, min(i + mb, B))
            sub = batch.select_rows(range(rows.start, rows.stop)).to(self.device)
            out.append((sub, prep.rows(rows, self.device)))
        return out

    # ------------------------------------------------------------------ outputs

    def _vocab_entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """Entropy of softmax(logits) over the vocab shards of the TP group (full logits never gathered)."""
        import torch.distributed as dist
        from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

        m = logits.detach().max(dim=-1, keepdim=True).values
        if self.tp > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.ps.get_tensor_model_parallel_group())
        z = logits - m
        e = z.exp()
        se = reduce_from_tensor_model_parallel_region(e.sum(-1))
        sez = reduce_from_tensor_model_parallel_region((e * z).sum(-1))
        return se.log() - sez / se

    def _outputs(self, output: torch.Tensor, sub: RolloutBatch, prep: RightPadded) -> dict[str, torch.Tensor]:
        """Per response token: ``logp`` and ``entropy`` (policy) or ``values`` (critic), zero where mask is 0."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        pos = prep.pos
        keep = sub.mask.to(output.device) != 0
        sel = output.gather(1, pos.unsqueeze(-1).expand(-1, -1, output.shape[-1])).float()
        if self.role == "critic":
            return {"values": torch.where(keep, sel.squeeze(-1), torch.zeros((), device=sel.device))}
        logits = sel / self.temperature
        entropy = self._vocab_entropy(logits)
        target = torch.where(keep, sub.responses, torch.zeros_like(sub.responses))
        logp = -vocab_parallel_cross_entropy(logits.clone(), target)
        zero = torch.zeros((), device=logp.device)
        return {"logp": torch.where(keep, logp, zero), "entropy": torch.where(keep, entropy, zero)}

    def _run(self, micro: list[tuple[RolloutBatch, RightPadded]], step_fn: Callable, forward_only: bool) -> list:
        """Megatron's schedule (pipelined when PP > 1) over ``micro``; returns what
        ``step_fn(output, sub, prep)`` gave per micro-batch on the last stage (an empty list elsewhere)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        it = iter(micro)

        def forward_step(data_iterator, model):
            sub, prep = next(data_iterator)
            out = model(prep.ids, prep.positions, prep.amask)

            def loss_func(output_tensor):
                loss, record = step_fn(output_tensor, sub, prep)
                return loss, torch.zeros((), dtype=torch.int), record
            return out, loss_func

        s_eff = micro[0][1].ids.shape[1]
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else _nullcontext()
        with ctx:
            return get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=it, model=[self.model], num_microbatches=len(micro),
                seq_length=s_eff, micro_batch_size=max(prep.ids.shape[0] for _, prep in micro),
                forward_only=forward_only)

    def _from_last_stage(self, tensor: torch.Tensor | None, shape, dtype=torch.float32) -> torch.Tensor:
        """``tensor`` of the last pipeline stage, on every stage of this pipeline."""
        import torch.distributed as dist

        if self.pp == 1:
            return tensor
        buf = tensor.contiguous() if self.last_stage else torch.empty(shape, dtype=dtype, device=self.device)
        group = self.ps.get_pipeline_model_parallel_group()
        dist.broadcast(buf, src=dist.get_global_rank(group, self.pp - 1), group=group)
        return buf

    def _objects_from_last_stage(self, obj):
        import torch.distributed as dist

        if self.pp == 1:
            return obj
        box = [obj if self.last_stage else None]
        group = self.ps.get_pipeline_model_parallel_group()
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, self.pp - 1), group=group)
        return box[0]

    @torch.no_grad()
    def forward(self, batch: RolloutBatch, micro_batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """``{"logp", "entropy"}`` (policy) or ``{"values"}`` (critic), each ``[B, T]`` float32 on the CPU,
        on every rank (zero where ``mask`` is 0). Collective over the model-parallel group."""
        self.model.train(False)
        micro = self._micro_batches(batch, micro_batch_size or self.micro_batch_size)
        keys = ("values",) if self.role == "critic" else ("logp", "entropy")
        store = self._run(micro, lambda out, sub, prep: (torch.zeros(()), self._outputs(out, sub, prep)),
                          forward_only=True)
        B, T = batch.mask.shape
        result = {}
        for k in keys:
            full = torch.cat([d[k] for d in store], 0) if self.last_stage else None
            result[k] = self._from_last_stage(full, (B, T)).float().cpu()
        return result

    def logprobs(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy: ``(logp, entropy)`` ``[B, T]`` of the response tokens, logits divided by the temperature."""
        if self.role != "policy":
            raise MegatronEngineError("logprobs: this engine is a critic")
        out = self.forward(batch)
        return out["logp"], out["entropy"]

    def values(self, batch: RolloutBatch) -> torch.Tensor:
        """Critic: values ``[B, T]``; V_t is read at the state that predicts response token t."""
        if self.role != "critic":
            raise MegatronEngineError("values: this engine is a policy")
        return self.forward(batch)["values"]

    # ------------------------------------------------------------------ training

    def forward_backward(self, batch: ScoredBatch, loss_fn: Callable, micro_batch_size: int | None = None
                         ) -> list[dict[str, float]]:
        """Accumulate gradients of ``loss_fn`` over the micro-batches of ``batch`` (no optimizer step).

        ``loss_fn(outputs, sub_batch) -> (loss, stats)``: ``outputs`` as ``forward`` gives them (with
        grad), ``sub_batch`` the micro-batch's rows of ``batch``. The loss is back-propagated as given,
        never rescaled by the number of micro-batches (normalise it by the global token count and
        multiply by ``dp_size``, as ``rlhf.algo.policy_loss(num_tokens=..., dp_world_size=...)`` does).
        Returns one dict per micro-batch: the stats as floats plus ``loss`` (the value returned), on
        every rank. Raises ``FloatingPointError`` on a non-finite loss (before any optimizer step).
        """
        if self._reduced:
            raise RuntimeError("forward_backward after reduce_gradients: call step() or zero_grad() first")
        self.model.train(True)
        micro = self._micro_batches(batch, micro_batch_size or self.micro_batch_size)

        def step_fn(out, sub, prep):
            loss, stats = loss_fn(self._outputs(out, sub, prep), sub)
            rec = {k: float(v) for k, v in stats.items()}
            rec["loss"] = float(loss.detach())
            return loss, rec

        records = self._objects_from_last_stage(self._run(micro, step_fn, forward_only=False))
        for r in records:
            if not (r["loss"] == r["loss"] and abs(r["loss"]) != float("inf")):
                raise FloatingPointError(f"non-finite loss {r['loss']} (rank {self.rank})")
        return records

    def reduce_gradients(self) -> None:
        """Average the accumulated gradients over data-parallel ranks and sum tied embeddings over the
        PP embedding group; once per optimizer step (``step`` calls it; a second call is a no-op)."""
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        if self._reduced:
            return
        self._reduced = True
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.pp > 1 and self.spec.tied and self.role == "policy" and self.ps.is_rank_in_embedding_group():
            w = self.model.shared_embedding_or_output_weight()
            dist.all_reduce(w.grad, group=self.ps.get_embedding_group())
        if self.dp_size > 1:
            grads = [p.grad for p in self.params]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.ps.get_data_parallel_group())
            flat /= self.dp_size
            for g, r in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(r)

    def _grad_norm(self) -> float:
        import torch.distributed as dist

        skip = None
        if self.pp > 1 and self.spec.tied and self.role == "policy" and self.last_stage and not self.first_stage:
            skip = self.model.output_layer.weight  # the first stage's embedding counts the tied weight
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.params:
            if p is skip:
                continue
            if getattr(p, "tensor_model_parallel", False) or self.tp_rank == 0:
                sq += p.grad.detach().double().pow(2).sum()
        if self.tp * self.pp > 1:
            dist.all_reduce(sq, group=self.ps.get_model_parallel_group())
        return float(sq.sqrt())

    def step(self) -> dict[str, float]:
        """Reduce gradients, clip, one AdamW step and LR-schedule step; returns ``grad_norm`` (before
        clipping) and ``lr`` (after the schedule step, as the DeepSpeed engine reports it)."""
        self.reduce_gradients()
        norm = self._grad_norm()
        if self.grad_clip and norm > 0:
            coef = self.grad_clip / (norm + 1e-6)
            if coef < 1.0:
                for p in self.params:
                    p.grad.mul_(coef)
        if self._shard is not None:
            self._shard.set_grad()
        self.optimizer.step()
        if self._shard is not None:
            self._shard.gather_params()
        self.scheduler.step()
        self.zero_grad()
        self.steps += 1
        return {"grad_norm": norm, "lr": float(self.scheduler.get_last_lr()[0])}

    def zero_grad(self) -> None:
        """Drop accumulated gradients without stepping."""
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None
        self._reduced = False

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    # ------------------------------------------------------------------ weights out

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full CPU tensor) for every parameter, gathered over TP and PP, on every rank.

        Collective: every rank of the role must consume the iterator to the end. One full tensor is
        materialised at a time.
        """
        return self._export(lambda p: p.detach())

    def export_gradients(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full CPU tensor) of the accumulated gradients, reduced over data-parallel ranks
        (``reduce_gradients``) and gathered like ``export_weights``; for checks and debugging
        (collective, call between ``forward_backward`` and ``step``)."""
        self.reduce_gradients()
        return self._export(lambda p: p.grad.detach())

    def _export(self, tensor_of) -> Iterator[tuple[str, torch.Tensor]]:
        import torch.distributed as dist

        local = dict(self.model.named_parameters())
        layers_per_stage = self.spec.num_layers // self.pp
        tp_group = self.ps.get_tensor_model_parallel_group()
        pp_group = self.ps.get_pipeline_model_parallel_group()
        for hf in hf_names(self.spec, self.role):
            stage, mname = megatron_name(self.spec, hf, self.role, layers_per_stage)
            t = None
            if stage == self.pp_rank:
                p = tensor_of(local[mname])
                if self.tp > 1 and getattr(local[mname], "tensor_model_parallel", False):
                    shards = [torch.empty_like(p) for _ in range(self.tp)]
                    dist.all_gather(shards, p.contiguous(), group=tp_group)
                else:
                    shards = [p]
                t = hf_from_full(self.spec, hf, shards).contiguous()
            if self.pp > 1:
                buf = t if t is not None else torch.empty(hf_shape(self.spec, hf), dtype=torch.float32,
                                                          device=self.device)
                dist.broadcast(buf, src=dist.get_global_rank(pp_group, stage), group=pp_group)
                t = buf
            yield hf, t.to("cpu", copy=True)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """``dict(export_weights())`` (collective)."""
        return dict(self.export_weights())

    def save_pretrained(self, out_dir: str | Path, max_shard_bytes: int = 4 << 30) -> None:
        """An ordinary HF checkpoint (config.json, sharded safetensors with an index when over one shard,
        tokenizer and generation files copied from ``model_dir``); collective, global rank 0 writes."""
        import shutil

        import torch.distributed as dist
        from safetensors.torch import save

        from bairlhf.outputs import atomic_write

        out = Path(out_dir)
        writer = self.rank == 0
        if writer:
            out.mkdir(parents=True, exist_ok=True)
        shards: list[list[str]] = [[]]
        cur: dict[str, torch.Tensor] = {}
        size, files = 0, []

        def flush():
            nonlocal cur, size
            if cur:
                name = f".shard-{len(files):05d}.safetensors"
                atomic_write(out / name, save(cur, metadata={"format": "pt"}))
                files.append((name, list(cur)))
            cur, size = {}, 0

        for name, t in self.export_weights():
            if not writer:
                continue
            nbytes = t.numel() * t.element_size()
            if cur and size + nbytes > max_shard_bytes:
                flush()
            cur[name] = t
            size += nbytes
        if writer:
            flush()
            if len(files) == 1:
                os.replace(out / files[0][0], out / "model.safetensors")
            else:
                weight_map = {}
                for i, (tmp, names) in enumerate(files):
                    final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
                    os.replace(out / tmp, out / final)
                    weight_map.update({n: final for n in names})
                atomic_write(out / "model.safetensors.index.json",
                             json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
            cfg = json.loads((self.model_dir / "config.json").read_text())
            head = {"llama": "Llama", "qwen2": "Qwen2"}[self.spec.arch]
            if self.role == "critic":
                cfg.update(architectures=[f"{head}ForSequenceClassification"], id2label={"0": "LABEL_0"},
                           label2id={"LABEL_0": 0})
            else:
                cfg.update(architectures=[f"{head}ForCausalLM"])
            atomic_write(out / "config.json", json.dumps(cfg, indent=2))
            for f in self.model_dir.iterdir():
                if f.is_file() and f.name != "config.json" and not f.name.startswith("model") \
                        and not f.name.endswith((".safetensors", ".bin", ".pt")):
                    shutil.copy2(f, out / f.name)
        if self.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------------ exact state

    def _layout(self) -> dict:
        return {"version": STATE_VERSION, "role": self.role, "arch": self.spec.arch, "tp": self.tp, "pp": self.pp,
                "dp": self.dp_size, "world": self.world_size, "sharded_optimizer": self._shard is not None}

    def _state_paths(self, d: Path) -> tuple[Path, Path]:
        stem = f"megatron_tp{self.tp_rank}_pp{self.pp_rank}_dp{self.dp_rank}"
        return d / f"{stem}.safetensors", d / f"{stem}.json"

    def save_state(self, out_dir: str | Path) -> None:
        """Weights, AdamW states, LR schedule and RNG of this rank (safetensors + JSON, no pickle);
        every rank calls it and writes its own two files."""
        import torch.distributed as dist
        from megatron.core import tensor_parallel
        from safetensors.torch import save

        from bairlhf.outputs import atomic_write

        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for name, p in self.model.named_parameters():
            tensors[f"model/{name}"] = p.detach().cpu().contiguous()
        osd = self.optimizer.state_dict()
        names = self._opt_names
        for idx, st in osd["state"].items():
            for k, v in st.items():
                tensors[f"optim/{names[idx]}/{k}"] = v.detach().cpu().contiguous().reshape(v.shape)
        tensors["rng/torch"] = torch.get_rng_state()
        for name, st in tensor_parallel.get_cuda_rng_tracker().get_states().items():
            tensors[f"rng/tracker/{name}"] = st.cpu()
        if torch.cuda.is_available():
            tensors["rng/cuda"] = torch.cuda.get_rng_state()
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
                  for g in osd["param_groups"]]
        sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        meta = {"layout": self._layout(), "steps": self.steps, "param_groups": groups, "scheduler": sched,
                "tracker_names": sorted(tensor_parallel.get_cuda_rng_tracker().get_states())}
        tpath, jpath = self._state_paths(d)
        atomic_write(tpath, save(tensors, metadata={"format": "pt"}))
        atomic_write(jpath, json.dumps(meta, indent=1))
        if self.world_size > 1:
            dist.barrier()

    def load_state(self, in_dir: str | Path) -> None:
        """Restore what ``save_state`` wrote (same role, architecture and TP / PP / DP layout)."""
        from megatron.core import tensor_parallel
        from safetensors.torch import load_file

        d = Path(in_dir)
        tpath, jpath = self._state_paths(d)
        if not tpath.is_file() or not jpath.is_file():
            raise MegatronEngineError(f"{d}: no megatron engine state for this rank ({tpath.name})")
        meta = json.loads(jpath.read_text())
        if meta.get("layout") != self._layout():
            raise MegatronEngineError(f"{jpath}: saved layout {meta.get('layout')} differs from this engine's "
                                      f"{self._layout()}")
        tensors = load_file(str(tpath))
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                key = f"model/{name}"
                if key not in tensors or tuple(tensors[key].shape) != tuple(p.shape):
                    raise MegatronEngineError(f"{tpath}: tensor {key!r} missing or of the wrong shape")
                p.copy_(tensors[key])
        if self._shard is not None:
            self._shard.load_master()
        names = self._opt_names
        state = {}
        for idx, n in enumerate(names):
            st = {k.rsplit("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"optim/{n}/")}
            if st:
                state[idx] = st
        groups = []
        for g, saved in zip(self.optimizer.state_dict()["param_groups"], meta["param_groups"]):
            saved = dict(saved)
            if "betas" in saved:
                saved["betas"] = tuple(saved["betas"])
            saved["params"] = g["params"]
            groups.append(saved)
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None]})
        self.steps = int(meta["steps"])
        self.zero_grad()
        torch.set_rng_state(tensors["rng/torch"])
        tensor_parallel.get_cuda_rng_tracker().set_states(
            {n: tensors[f"rng/tracker/{n}"] for n in meta["tracker_names"]})
        if torch.cuda.is_available() and "rng/cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng/cuda"])

    def destroy(self) -> None:
        """Tear down megatron's parallel state (and the process group when this engine created it)."""
        import torch.distributed as dist

        if self.ps.model_parallel_is_initialized():
            self.ps.destroy_model_parallel()
        if self._own_group and dist.is_initialized():
            dist.destroy_process_group()


class _DPShard:
    """The distributed optimizer, our own ZeRO-1: this rank's parameters flattened, and AdamW run only
    on this data-parallel rank's 1/dp slice of them (``master``, fp32), so each rank holds 1/dp of
    the optimizer state; after the step the slices are all-gathered back into the parameters. AdamW
    is elementwise and the clip coefficient is global, so the result equals the replicated optimizer.
    Gradients arrive already averaged over DP (one all-reduce: gloo has no reduce-scatter)."""

    def __init__(self, params: list[torch.Tensor], rank: int, size: int, group):
        self.params, self.rank, self.size, self.group = params, rank, size, group
        self.total = sum(p.numel() for p in params)
        self.chunk = -(-self.total // size)
        self.master = torch.nn.Parameter(torch.zeros(self.chunk, dtype=torch.float32, device=params[0].device))
        self.load_master()

    def _flat(self, tensors) -> torch.Tensor:
        flat = torch.zeros(self.chunk * self.size, dtype=torch.float32, device=self.master.device)
        flat[:self.total] = torch.cat([t.reshape(-1).float() for t in tensors])
        return flat

    def load_master(self) -> None:
        """``master`` = this rank's slice of the current parameters."""
        with torch.no_grad():
            self.master.copy_(self._flat(self.params)[self.rank * self.chunk:(self.rank + 1) * self.chunk])

    def set_grad(self) -> None:
        self.master.grad = self._flat([p.grad for p in self.params])[
            self.rank * self.chunk:(self.rank + 1) * self.chunk].clone()

    def gather_params(self) -> None:
        import torch.distributed as dist

        parts = [torch.empty_like(self.master) for _ in range(self.size)]
        dist.all_gather(parts, self.master.detach().contiguous(), group=self.group)
        flat = torch.cat(parts)[:self.total]
        with torch.no_grad():
            off = 0
            for p in self.params:
                p.copy_(flat[off:off + p.numel()].view_as(p))
                off += p.numel()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
