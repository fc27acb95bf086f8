"""Ray actors for the five PPO roles: actor, critic (trainable, DeepSpeed), reference, reward
(frozen) and rollout (a ``RolloutEngine``).

Batches travel as dicts of CPU tensors (``rlhf.workers.batch``): ``input_ids``, ``attention_mask``,
``position_ids`` ``[B, P+T]`` (prompts left-padded to P, responses right-padded to T) and
response-aligned ``[B, T]`` tensors. Trainable workers receive the whole batch plus a plan (for
each epoch and mini-batch, the rows this rank trains on and the global token count), so every
data-parallel layout computes the same token-mean loss.
"""

from __future__ import annotations

import os
import socket

import ray
import torch

from rlhf.workers.batch import response_slice, select_rows, to_device

WORKER_ENV = {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1"}


def _worker_setup(threads: int) -> None:
    """Env and torch threads of a worker process (set here, not via a Ray runtime_env, so Ray can
    reuse its pre-started worker processes)."""
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    torch.set_num_threads(max(1, threads))


def device() -> torch.device:
    """This worker's device: its (Ray-assigned) GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _forward_hidden_or_logits(model, batch, **kw):
    batch = to_device(batch, next(model.parameters()).device)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"], use_cache=False, **kw)


def policy_logits(model, batch: dict, temperature: float) -> torch.Tensor:
    """Logits ``[B, T, V]`` that predict each response token (divided by the sampling temperature)."""
    logits = _forward_hidden_or_logits(model, batch).logits
    return response_slice(logits, batch).float() / temperature


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


def critic_values(model, batch: dict) -> torch.Tensor:
    """Values ``[B, T]``: V_t is read at the state that predicts response token t (same positions
    as the policy's logits, so the value mask is the response mask, unshifted)."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = _forward_hidden_or_logits(backbone, batch).last_hidden_state
    return model.score(response_slice(hidden, batch)).squeeze(-1).float()


def reward_model_scores(model, batch: dict) -> torch.Tensor:
    """Scores ``[B]`` of a sequence-classification reward model, read at the last response token
    itself (EOS when finished), as the classifier reads its last non-pad token; never at a pad."""
    from rlhf.algo import last_token_index

    backbone = getattr(model, model.base_model_prefix)
    hidden = _forward_hidden_or_logits(backbone, batch).last_hidden_state
    idx = (batch["prompt_len"] + last_token_index(batch["mask"])).to(hidden.device)
    return model.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]).squeeze(-1).float().cpu()


def _setup_dist(rank: int, world: int, addr: str, port: int) -> None:
    os.environ.update({"MASTER_ADDR": addr, "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": "0" if not torch.cuda.is_available() else "0"})


def free_port() -> tuple[str, int]:
    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


def ppo_update(engine, batch: dict, plan: list, micro: int, loss_fn) -> list[dict[str, float]]:
    """Run the planned mini-batches; ``loss_fn(engine, sub_batch, num_tokens) -> (loss, stats)``.

    Returns one stats dict per micro-batch (with ``tokens`` and ``loss`` as the local token mean)
    and one ``{grad_norm, lr}`` per optimizer step, for ``rlhf.metrics.reduce_update_stats``.
    Raises ``FloatingPointError`` on a non-finite loss (the trainer stops, keeping its last checkpoint).
    """
    engine.train(True)
    out: list[dict[str, float]] = []
    for epoch in plan:
        for rows, num_tokens in epoch:
            for i in range(0, len(rows), micro):
                sub = to_device(select_rows(batch, rows[i:i + micro]), engine.module.device)
                loss, stats = loss_fn(engine, sub, num_tokens)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} (rank {engine.rank})")
                engine.backward(loss)
                step = engine.step()
                rec = {k: float(v) for k, v in stats.items()}
                rec["loss"] = float(loss.detach()) * num_tokens / engine.world_size / max(rec["tokens"], 1.0)
                out.append(rec)
                if step:
                    out.append(step)
    return out


class _TrainableBase:
    """Shared plumbing of the actor and critic workers (process group, engine, checkpoints)."""

    engine = None

    def address(self) -> tuple[str, int]:
        return free_port()

    def init_engine(self, addr: str, port: int) -> None:
        """Join the role's process group (rank 0's address) and wrap the model in DeepSpeed."""
        from rlhf.engines.deepspeed_engine import DeepSpeedTrainEngine

        _setup_dist(self.rank, self.world, addr, port)
        self.engine = DeepSpeedTrainEngine(self.model, self.spec)
        self.model = None

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
    """One data-parallel rank of the trainable policy."""

    def __init__(self, model_path: str, spec, rank: int, world: int, ppo: dict, temperature: float,
                 threads: int = 1):
        from transformers import AutoModelForCausalLM

        _worker_setup(threads)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.spec, self.rank, self.world = spec, rank, world
        self.ppo, self.temperature, self.micro = ppo, temperature, spec.micro_batch_size

    @torch.no_grad()
    def logprobs(self, batch: dict, rows: list[int], top_k: int = 0,
                 top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[len(rows), T]`` logprobs of the taken response tokens (the PPO old policy), entropy,
        and the logprobs after the sampler's top-k / top-p filtering (to compare with the rollout's)."""
        from rlhf.algo import entropy_from_logits, logprobs_from_logits

        self.engine.train(False)
        sub = select_rows(batch, rows)
        logits = policy_logits(self.engine.module, sub, self.temperature)
        responses = sub["responses"].to(logits.device)
        logp = logprobs_from_logits(logits, responses)
        filtered = logp
        if top_k or top_p < 1.0:
            filtered = logprobs_from_logits(filter_logits(logits, top_k, top_p), responses)
        return logp.cpu(), entropy_from_logits(logits).cpu(), filtered.cpu()

    def train(self, batch: dict, plan: list) -> list[dict[str, float]]:
        from rlhf.algo import entropy_from_logits, logprobs_from_logits, masked_mean, policy_loss

        p = self.ppo

        def loss_fn(engine, sub, num_tokens):
            logits = policy_logits(engine.module, sub, self.temperature)
            logp = logprobs_from_logits(logits, sub["responses"])
            loss, stats = policy_loss(logp, sub["old_logp"], sub["advantages"], sub["mask"],
                                      clip_low=p["clip_low"], clip_high=p["clip_high"], dual_clip=p["dual_clip"],
                                      num_tokens=num_tokens, dp_world_size=engine.world_size,
                                      is_weights=sub.get("is_weights"))
            with torch.no_grad():
                stats["entropy"] = masked_mean(entropy_from_logits(logits), sub["mask"])
            return loss, stats

        return ppo_update(self.engine, batch, plan, self.micro, loss_fn)

    def weights(self):
        """Full HF-named weights on rank 0 (None elsewhere); every rank must be called (ZeRO-3)."""
        sd = dict(self.engine.named_full_parameters())
        return sd if self.engine.rank == 0 else None

    def weight_specs(self) -> list:
        """Name, dtype and full shape of every parameter, in broadcast order (no gathering needed
        on ZeRO-3: DeepSpeed keeps the full shape in ``ds_shape``)."""
        from rlhf.engines.vllm_weight_sync import WeightSpec

        return [WeightSpec(n, str(p.dtype).removeprefix("torch."), tuple(getattr(p, "ds_shape", p.shape)))
                for n, p in self.engine.module.named_parameters()]

    def open_weight_sync(self, host: str, port: int, world_size: int, backend: str) -> int:
        """Rank 0 hosts and joins the broadcast group to the vLLM workers (blocks until all joined)."""
        from rlhf.engines import vllm_weight_sync as ws

        self._sync_group = ws.open_group(host, port, 0, world_size, backend)
        return 0

    def broadcast_weights(self) -> int:
        """Every rank gathers (ZeRO-3) each parameter in turn; rank 0 broadcasts it to the vLLM
        workers as it comes, so the full model is never held twice. Returns bytes sent (0 off rank 0)."""
        from rlhf.engines import vllm_weight_sync as ws

        params = self.engine.named_full_parameters()
        if self.engine.rank != 0:
            for _ in params:  # join every gather
                pass
            return 0
        return ws.broadcast_weights(self._sync_group, params, device())


@ray.remote
class CriticWorker(_TrainableBase):
    """One data-parallel rank of the trainable value model (a sequence-classification model read per token)."""

    def __init__(self, model_path: str, spec, rank: int, world: int, ppo: dict, seed: int, threads: int = 1):
        from transformers import AutoModelForSequenceClassification

        _worker_setup(threads)
        torch.manual_seed(seed)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1,
                                                                        dtype=torch.float32)
        self.spec, self.rank, self.world = spec, rank, world
        self.ppo, self.micro = ppo, spec.micro_batch_size

    @torch.no_grad()
    def values(self, batch: dict, rows: list[int]) -> torch.Tensor:
        self.engine.train(False)
        return critic_values(self.engine.module, select_rows(batch, rows)).cpu()

    def train(self, batch: dict, plan: list) -> list[dict[str, float]]:
        from rlhf.algo import value_loss

        def loss_fn(engine, sub, num_tokens):
            v = critic_values(engine.module, sub)
            return value_loss(v, sub["old_values"], sub["returns"], sub["mask"], clip=self.ppo["value_clip"],
                              num_tokens=num_tokens, dp_world_size=engine.world_size)

        return ppo_update(self.engine, batch, plan, self.micro, loss_fn)


@ray.remote
class ReferenceWorker:
    """The frozen reference policy."""

    def __init__(self, model_path: str, temperature: float, threads: int = 1, dtype: str = "float32"):
        from transformers import AutoModelForCausalLM

        _worker_setup(threads)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device()).eval()
        self.temperature = temperature

    @torch.no_grad()
    def logprobs(self, batch: dict) -> torch.Tensor:
        from rlhf.algo import logprobs_from_logits

        logits = policy_logits(self.model, batch, self.temperature)
        return logprobs_from_logits(logits, batch["responses"].to(logits.device)).cpu()

    def pid(self) -> int:
        return os.getpid()


@ray.remote
class RewardWorker:
    """The frozen reward: a sequence-classification model scored at the last response token, or a
    rule-based ``module:function`` applied to the decoded texts."""

    def __init__(self, tokenizer_path: str, model_path: str | None, function: str | None, threads: int = 1,
                 metrics: str | None = None, dtype: str = "float32", allow_local: bool = False,
                 run_dir: str | None = None, driver_cwd: str | None = None):
        from transformers import AutoTokenizer

        _worker_setup(threads)
        self.tok = AutoTokenizer.from_pretrained(tokenizer_path)
        self.model = self.fn = None
        if model_path is not None:
            from transformers import AutoModelForSequenceClassification

            self.model = AutoModelForSequenceClassification.from_pretrained(
                model_path, num_labels=1, dtype=getattr(torch, dtype)).to(device()).eval()
        else:
            from rlhf.rewards import load_reward_function

            self.fn = load_reward_function(function, "reward.function", [run_dir] if run_dir else [], allow_local,
                                           [driver_cwd] if driver_cwd else [])
        if metrics is not None:
            from rlhf.rewards import load_reward_function

            self.metrics_fn = load_reward_function(metrics, "reward.metrics", [run_dir] if run_dir else [], allow_local,
                                                   [driver_cwd] if driver_cwd else [])

    @torch.no_grad()
    def score(self, batch: dict, prompts: list[list[int]], responses: list[list[int]],
              finished: list[bool]) -> torch.Tensor:
        if self.model is not None:
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
    """Holds a ``RolloutEngine`` (transformers generate on CPU; vLLM at scale).

    ``vllm``: ``VLLMEngineConfig`` overrides for ``engine == "vllm"`` (``num_engines``,
    ``tensor_parallel_size``, ``num_gpus``, ``bundles`` from the placement plan, ...)."""

    def __init__(self, engine: str, model_path: str, pad_id: int, eos_id: int, threads: int = 1,
                 vllm: dict | None = None, dtype: str = "float32"):
        _worker_setup(threads)
        if engine == "hf":
            from rlhf.engines.hf_rollout import HFRolloutEngine

            self.engine = HFRolloutEngine(model_path, pad_token_id=pad_id, eos_token_id=eos_id,
                                          dtype=getattr(torch, dtype))
        else:
            from rlhf.engines import vllm_engine  # the scale path (its own issue)

            self.engine = vllm_engine.make_engine(model_path, **(vllm or {}))

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
