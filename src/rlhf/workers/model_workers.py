"""Ray actors for the five PPO roles: actor, critic (trainable, a ``TrainingEngine``), reference,
reward (frozen) and rollout (a ``RolloutEngine``).

Each worker is built from its role's spec record (``rlhf.workers.specs``). Batches travel as
``rlhf.workers.batch`` records of CPU tensors: a ``RolloutBatch`` to score (``input_ids``,
``attention_mask``, ``position_ids`` ``[B, P+T]``, prompts left-padded to P, responses right-padded
to T, response-aligned ``[B, T]`` tensors) and a ``ScoredBatch`` to train on. Trainable workers
receive the whole batch plus a plan (for each epoch and mini-batch, the rows this rank trains on and
the global token count), so every data-parallel layout computes the same token-mean loss.

The actor and critic workers are thin: the engine class comes from ``cfg.engine.<role>`` through
``rlhf.engines.base.ENGINES`` and owns the forward, micro-batching, optimizer and checkpoints; the
workers hold only the PPO loss functions. Ranks of one model-parallel group (megatron TP / PP) are
handed different rows by the trainer like data-parallel ranks; the worker pools the rows of its
group (one ``all_gather_object``), the group computes them together, and each rank returns its own
rows (training records only from the group's first rank, so no micro-batch is counted twice).
"""

from __future__ import annotations

import os

import ray
import torch

from rlhf.engines.accelerator import attn_implementation
from rlhf.engines.deepspeed_engine import (critic_values, filter_logits, free_port,  # noqa: F401  (re-exported)
                                           policy_logits, _forward_hidden_or_logits)
from rlhf.workers.batch import RolloutBatch, ScoredBatch, budget_groups, forward_in_micro_batches
from rlhf.workers.specs import ReferenceSpec, RewardSpec, RolloutSpec, TrainableSpec

WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
"""Env defaults of every worker process (``DS_ACCELERATOR`` is chosen per process by
``rlhf.engines.accelerator.worker_env``: ``cuda`` where the worker sees a GPU, else ``cpu``)."""


def _worker_setup(threads: int) -> None:
    """Env and torch threads of a worker process (set here, not via a Ray runtime_env, so Ray can
    reuse its pre-started worker processes)."""
    from rlhf.engines.accelerator import worker_env

    for k, v in worker_env(WORKER_ENV, torch.cuda.is_available(), os.environ).items():
        os.environ.setdefault(k, v)
    torch.set_num_threads(max(1, threads))


def device() -> torch.device:
    """This worker's device: its (Ray-assigned) GPU when there is one, else the CPU."""
    from rlhf.engines.accelerator import model_device

    return torch.device(model_device(torch.cuda.is_available()))


def reward_model_scores(model, batch: RolloutBatch) -> torch.Tensor:
    """Scores ``[B]`` of a sequence-classification reward model, read at the last response token
    itself (EOS when finished), as the classifier reads its last non-pad token; never at a pad."""
    from rlhf.algo import last_token_index

    backbone = getattr(model, model.base_model_prefix)
    hidden = _forward_hidden_or_logits(backbone, batch).last_hidden_state
    idx = (batch.prompt_len + last_token_index(batch.mask)).to(hidden.device)
    return model.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]).squeeze(-1).float().cpu()


def _setup_dist(rank: int, world: int, addr: str, port: int) -> None:
    os.environ.update({"MASTER_ADDR": addr, "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": "0"})  # a Ray worker sees its one GPU as cuda:0


def node_port() -> tuple[str, int]:
    """This node's address and a port free on every interface (rank 0's rendezvous)."""
    return ray.util.get_node_ip_address(), free_port("")


class _TrainableBase:
    """Shared plumbing of the actor and critic workers: the engine (``ENGINES[engine]``), the rows of
    the model-parallel group, the PPO update loop, checkpoints."""

    engine = None
    role = "policy"

    def __init__(self, spec: TrainableSpec, rank: int, world: int):
        from rlhf.engines.base import engine_class

        _worker_setup(spec.threads)
        self.spec, self.engine_cls = spec, engine_class(spec.engine)
        self.rank, self.world, self.loss = rank, world, spec.loss

    def address(self) -> tuple[str, int]:
        return node_port()

    def init_engine(self, addr: str, port: int) -> None:
        """Join the role's process group (rank 0's address) and build the engine from the checkpoint."""
        _setup_dist(self.rank, self.world, addr, port)
        s = self.spec
        self.engine = self.engine_cls.from_pretrained(s.model_path, self.role, s.settings, s.args)

    # ------------------------------------------------------------------ rows of the model-parallel group

    def _group(self):
        return getattr(self.engine, "model_parallel_group", None)

    def _pool(self, rows) -> tuple[list[int], slice, bool]:
        """(rows of this rank's model-parallel group in group-rank order, where this rank's rows lie in
        them, whether this rank reports the group's training records)."""
        rows = list(rows)
        g = self._group()
        if g is None:
            return rows, slice(0, len(rows)), True
        import torch.distributed as dist

        parts = [None] * dist.get_world_size(g)
        dist.all_gather_object(parts, rows, group=g)
        me = dist.get_rank(g)
        start = sum(len(p) for p in parts[:me])
        return [r for p in parts for r in p], slice(start, start + len(rows)), me == 0

    def _forward(self, batch: RolloutBatch, rows, **kw) -> dict[str, torch.Tensor]:
        pooled, mine, _ = self._pool(rows)
        out = self.engine.forward(batch.select_rows(pooled), **kw)
        return {k: v[mine] for k, v in out.items()}

    def _update(self, batch: ScoredBatch, plan: list, loss_of) -> list[dict[str, float]]:
        """Run the planned mini-batches; ``loss_of(num_tokens)`` gives the engine's ``loss_fn``.

        Returns one stats dict per micro-batch (with ``tokens`` and ``loss`` as the local token mean)
        and one ``{grad_norm, lr}`` per optimizer step, for ``rlhf.metrics.reduce_update_stats``.
        A non-finite loss raises ``FloatingPointError`` in the engine (the trainer stops, keeping its
        last checkpoint)."""
        out: list[dict[str, float]] = []
        dp = self.engine.dp_size
        for epoch in plan:
            for rows, num_tokens in epoch:
                pooled, _, report = self._pool(rows)
                if not pooled:
                    continue
                recs = self.engine.forward_backward(batch.select_rows(pooled), loss_of(num_tokens))
                step = self.engine.step()
                if not report:
                    continue
                for rec in recs:
                    rec["loss"] = rec["loss"] * num_tokens / dp / max(rec["tokens"], 1.0)
                    out.append(rec)
                if step:
                    out.append(step)
        return out

    # ------------------------------------------------------------------ rollbacks (``metrics.on_*: rollback``)

    def scale_lr(self, factor: float) -> list[float]:
        """Multiply this rank's learning rates by ``factor`` from now on: the optimizer's current
        ones and the schedule's peaks (``scheduler.base_lrs``, so the warm-up / constant schedule
        goes on scaled). Both engines keep them in the state ``save_state`` writes, so a resume
        keeps the change. Returns the new learning rates, one per parameter group."""
        opt, sched = self.engine.optimizer, getattr(self.engine, "scheduler", None)
        for g in opt.param_groups:
            g["lr"] = g["lr"] * factor
        if sched is not None:
            sched.base_lrs = [b * factor for b in sched.base_lrs]
            sched._last_lr = [g["lr"] for g in opt.param_groups]  # what get_last_lr reports
        return [float(g["lr"]) for g in opt.param_groups]

    def rebuild(self, model_dir: str) -> None:
        """Re-initialize this rank's engine from the Hugging Face checkpoint ``model_dir`` in the
        same process group, with a fresh optimizer and LR schedule (the ``merge`` rollback's
        re-merged actor; DeepSpeed engines only, the trainer refuses it for megatron)."""
        s = self.spec
        self.engine.destroy(group=False)
        self.engine = None
        self.engine = self.engine_cls.from_pretrained(model_dir, self.role, s.settings, s.args)

    # ------------------------------------------------------------------ checkpoints

    def save_state(self, out_dir: str) -> None:
        self.engine.save_state(out_dir)

    def load_state(self, in_dir: str) -> None:
        self.engine.load_state(in_dir)

    def save_pretrained(self, out_dir: str) -> None:
        self.engine.save_pretrained(out_dir)

    def pid(self) -> int:
        return os.getpid()

    def destroy(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None


@ray.remote
class ActorWorker(_TrainableBase):
    """One rank of the trainable policy."""

    role = "policy"

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch, rows: list[int], top_k: int = 0,
                 top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[len(rows), T]`` logprobs of the taken response tokens (the PPO old policy), entropy,
        and the logprobs after the sampler's top-k / top-p filtering (to compare with the rollout's)."""
        filtering = bool(top_k) or top_p < 1.0
        if filtering and not getattr(self.engine, "filtered_logprobs", True):
            raise ValueError("the actor's training engine cannot compute top-k / top-p filtered logprobs "
                             "(megatron never gathers the full logits): use rollout.top_k=0 rollout.top_p=1.0")
        out = self._forward(batch, rows, **({"top_k": top_k, "top_p": top_p} if filtering else {}))
        return out["logp"], out["entropy"], out.get("logp_filtered", out["logp"])

    def train(self, batch: ScoredBatch, plan: list) -> list[dict[str, float]]:
        from rlhf.algo import masked_mean, policy_loss

        p, dp = self.loss, self.engine.dp_size

        def loss_of(num_tokens):
            def loss_fn(out, sub: ScoredBatch):
                loss, stats = policy_loss(out["logp"], sub.old_logp, sub.advantages, sub.mask,
                                          clip_low=p.clip_low, clip_high=p.clip_high, dual_clip=p.dual_clip,
                                          num_tokens=num_tokens, dp_world_size=dp, is_weights=sub.is_weights)
                with torch.no_grad():
                    stats["entropy"] = masked_mean(out["entropy"].detach(), sub.mask)
                return loss, stats
            return loss_fn

        return self._update(batch, plan, loss_of)

    def export_to(self, step):
        """Run one actor-side step of the weight sync (``rlhf.workers.weight_sync``: collect, specs,
        open the broadcast sender, broadcast) on this rank's engine; the transport lives there."""
        return step(self.engine)


@ray.remote
class CriticWorker(_TrainableBase):
    """One rank of the trainable value model (a sequence-classification model read per token)."""

    role = "critic"

    @torch.no_grad()
    def values(self, batch: RolloutBatch, rows: list[int]) -> torch.Tensor:
        return self._forward(batch, rows)["values"]

    def train(self, batch: ScoredBatch, plan: list) -> list[dict[str, float]]:
        from rlhf.algo import value_loss

        clip, dp = self.loss.value_clip, self.engine.dp_size

        def loss_of(num_tokens):
            def loss_fn(out, sub: ScoredBatch):
                return value_loss(out["values"], sub.old_values, sub.returns, sub.mask, clip=clip,
                                  num_tokens=num_tokens, dp_world_size=dp)
            return loss_fn

        return self._update(batch, plan, loss_of)


@ray.remote
class ReferenceWorker:
    """The frozen reference policy."""

    def __init__(self, spec: ReferenceSpec):
        from rlhf.engines.deepspeed_engine import load_hf_model

        _worker_setup(spec.threads)
        self.model = load_hf_model(spec.model_path, "policy", getattr(torch, spec.dtype),
                                   attn_implementation(spec.dtype == "bfloat16")).to(device()).eval()
        self.temperature, self.budget = spec.temperature, spec.max_tokens_per_micro_batch

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        from rlhf.algo import logprobs_from_logits

        def logp(sub: RolloutBatch) -> dict[str, torch.Tensor]:
            logits = policy_logits(self.model, sub, self.temperature)
            return {"logp": logprobs_from_logits(logits, sub.responses.to(logits.device)).cpu()}

        if self.budget:
            return forward_in_micro_batches(batch, budget_groups(batch, self.budget), logp)["logp"]
        return logp(batch)["logp"]

    def pid(self) -> int:
        return os.getpid()


@ray.remote
class RewardWorker:
    """The frozen reward: a sequence-classification model scored at the last response token, or a
    rule-based ``module:function`` applied to the decoded texts."""

    def __init__(self, spec: RewardSpec):
        from transformers import AutoTokenizer

        _worker_setup(spec.threads)
        self.tok = AutoTokenizer.from_pretrained(spec.tokenizer_path)
        self.model = self.fn = None
        self.budget = spec.max_tokens_per_micro_batch
        run_dirs, cwds = [spec.run_dir] if spec.run_dir else [], [spec.driver_cwd] if spec.driver_cwd else []
        if spec.model_path is not None:
            from transformers import AutoModelForSequenceClassification

            self.model = AutoModelForSequenceClassification.from_pretrained(
                spec.model_path, num_labels=1, dtype=getattr(torch, spec.dtype)).to(device()).eval()
        else:
            from rlhf.rewards import load_reward_function

            self.fn = load_reward_function(spec.function, "reward.function", run_dirs, spec.allow_local_code, cwds)
        if spec.metrics is not None:
            from rlhf.rewards import load_reward_function

            self.metrics_fn = load_reward_function(spec.metrics, "reward.metrics", run_dirs, spec.allow_local_code,
                                                   cwds)

    @torch.no_grad()
    def score(self, batch: RolloutBatch, prompts: list[list[int]], responses: list[list[int]],
              finished: list[bool]) -> torch.Tensor:
        if self.model is not None:
            if self.budget:
                return forward_in_micro_batches(batch, budget_groups(batch, self.budget),
                                                lambda sub: {"s": reward_model_scores(self.model, sub)})["s"]
            return reward_model_scores(self.model, batch)
        ptxt = self.tok.batch_decode(prompts, skip_special_tokens=False)
        rtxt = self.tok.batch_decode(responses, skip_special_tokens=True)
        return torch.tensor(self.fn(ptxt, rtxt, finished), dtype=torch.float32)

    def gold_metrics(self, prompts: list[list[int]], responses: list[list[int]], finished: list[bool]) -> dict:
        """``reward.metrics`` on the decoded texts (decoded as for rule-based rewards)."""
        ptxt = self.tok.batch_decode(prompts, skip_special_tokens=False)
        rtxt = self.tok.batch_decode(responses, skip_special_tokens=True)
        return {k: float(v) for k, v in self.metrics_fn(ptxt, rtxt, finished).items()}

    def pid(self) -> int:
        return os.getpid()


@ray.remote
class RolloutWorker:
    """Holds a ``RolloutEngine`` (transformers generate on CPU; vLLM at scale, built with the spec's
    ``vllm`` overrides: ``num_engines``, ``tensor_parallel_size``, ``num_gpus``, ``bundles``, ...)."""

    def __init__(self, spec: RolloutSpec):
        _worker_setup(spec.threads)
        if spec.engine == "hf":
            from rlhf.engines.hf_rollout import HFRolloutEngine

            self.engine = HFRolloutEngine(spec.model_path, pad_token_id=spec.pad_id, eos_token_id=spec.eos_id,
                                          dtype=getattr(torch, spec.dtype))
        else:
            from rlhf.engines import vllm_engine  # the scale path (its own issue)

            self.engine = vllm_engine.make_engine(spec.model_path, **(spec.vllm or {}))

    def generate(self, prompts, params):
        return self.engine.generate(prompts, params)

    def update_weights(self, state: dict) -> None:
        self.engine.update_weights(state.items())

    def sync_world_size(self) -> int:
        """Ranks of the broadcast group: the actor's rank 0 plus every vLLM worker."""
        return self.engine.sync_world_size

    def init_weight_sync(self, host: str, port: int, backend: str) -> list:
        """Every vLLM worker joins the broadcast group (blocks until the sender joins too)."""
        return ray.get(self.engine.init_weight_sync(host, port, backend))

    def receive_weights(self, specs: list) -> list[int]:
        """Receive one broadcast from the actor's rank 0 on every engine (blocks until done)."""
        return ray.get(self.engine.receive_weights(specs))

    def pid(self) -> int:
        return os.getpid()
