"""Placement groups and the set of Ray workers one PPO run uses.

Workers are placed by the placement plan (``rlhf.placement``) built from the config's cluster
section (``spec_from_ppo_config``), the same plan ``rlhf plan`` prints and the simulated 8 x 8
cluster test checks: one ``STRICT_PACK`` group per node, one bundle per GPU. ``cluster.colocate:
true`` puts every role on the same GPUs (bundle i hosts actor rank i, critic rank i; reference,
reward and the rollout worker sit on bundle 0), each taking its share of the GPU (OpenRLHF's
"colocate all" / veRL's hybrid layout); ``false`` gives each role its own GPUs.

Each worker is constructed from one spec record (``rlhf.workers.specs``) that the ``*_spec``
functions here fill from the config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import remove_placement_group

from rlhf.config import PPOConfig, role_parallel
from rlhf.engines.base import EngineArgs
from rlhf.placement import create_placement_groups, engine_bundles, make_plan, scheduling, spec_from_ppo_config
from rlhf.workers.model_workers import (ActorWorker, CriticWorker, ReferenceWorker, RewardWorker,
                                        RolloutWorker)
from rlhf.workers.preflight import uses_critic
from rlhf.workers.specs import PPOLossSettings, ReferenceSpec, RewardSpec, RolloutSpec, TrainableSpec
from rlhf.workers.weight_sync import WeightSync

WORKER_DEATHS = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ActorDiedError)
"""What a dead worker raises in the driver (the trainer restarts from the last checkpoint)."""


class WorkerStartError(RuntimeError):
    """A worker's constructor raised: not a crash to restart from, the message says why."""


def init_ray(address: str | None = None, **kwargs) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), or start a local Ray bound to 127.0.0.1 (GCS, raylet, object manager and
    worker ports listen on the loopback interface only; no dashboard). Ray resolves a
    ``_node_ip_address`` of 127.0.0.1 to the machine's IP unless its cluster mode is off
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read at import, hence the constant too)."""
    if ray.is_initialized():
        return
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("log_to_driver", False)
    address = address or os.environ.get("RAY_ADDRESS")  # a job on a cluster (ray job submit, KubeRay)
    if address is None:
        import ray._private.ray_constants as ray_constants

        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the processes Ray starts inherit it
        ray_constants.ENABLE_RAY_CLUSTER = False
        kwargs["_node_ip_address"] = "127.0.0.1"
    ray.init(address=address, **kwargs)


def _creation_error(e: Exception) -> str:
    """The last line of a failed constructor's remote traceback (``Type: message``)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


@dataclass
class ModelPaths:
    """Resolved model directories of one run."""

    actor: str
    """Actor init (after any BAI merge or tiny build)."""
    reference: str
    """Frozen reference policy."""
    critic: str
    """Critic init."""
    tokenizer: str
    """Tokenizer directory."""


@dataclass
class Workers:
    """Handles to every Ray worker of a run plus the placement groups they live in."""

    actor: list
    """``ActorWorker`` handles, one per rank."""
    critic: list
    """``CriticWorker`` handles, one per rank; empty when the advantage estimator needs no critic
    (``preflight.uses_critic``)."""
    reference: object
    """The ``ReferenceWorker``."""
    reward: object
    """The ``RewardWorker``."""
    rollout: object
    """The ``RolloutWorker``."""
    groups: list = field(default_factory=list)
    """The placement groups the workers live in (removed by ``shutdown``)."""
    weight_sync: object = None
    """``rlhf.workers.weight_sync.WeightSync``: how actor weights reach the rollout engine (its
    ``sync(actor, rollout)`` is the one call the trainer makes)."""

    def all(self) -> list:
        return [*self.actor, *self.critic, self.reference, self.reward, self.rollout]


def _options(cfg: PPOConfig, plan, pgs, role: str, rank: int, gpu: bool = True) -> dict:
    """Ray options of one worker: its plan slot's bundle, ``cluster.cpus_per_worker`` CPUs and its
    GPU share (none on a CPU-only plan)."""
    return scheduling(pgs, plan.of(role)[rank], num_cpus=cfg.cluster.cpus_per_worker, gpu=gpu and plan.spec.gpu)


def engine_args(cfg: PPOConfig, role: str) -> EngineArgs:
    """The backend-neutral build arguments of a trainable role (``actor`` or ``critic``)."""
    p, o = cfg.ppo, cfg.optim
    local_mini = p.mini_batch_size // role_parallel(cfg, role)[2]
    return EngineArgs(lr=o.actor_lr if role == "actor" else o.critic_lr, warmup_steps=o.warmup_steps,
                      weight_decay=o.weight_decay, betas=tuple(o.betas), grad_clip=o.grad_clip,
                      micro_batch_size=p.micro_batch_size, grad_accum=max(local_mini // p.micro_batch_size, 1),
                      max_tokens_per_micro_batch=p.max_tokens_per_micro_batch or 0,
                      seed=cfg.seed, temperature=cfg.rollout.temperature)


def engine_settings(cfg: PPOConfig, role: str):
    """(engine name, its config section) of a trainable role."""
    name = getattr(cfg.engine, role)
    return name, getattr(cfg, name)


def role_dtype(cfg: PPOConfig) -> str:
    """Weights dtype of the frozen roles and the rollout: bf16 when the actor trains in bf16."""
    from rlhf.engines.accelerator import weights_dtype

    name, settings = engine_settings(cfg, "actor")
    return weights_dtype(bool(settings.bf16), False)


def _trainable_group(cls, cfg, plan, pgs, role, n, spec: TrainableSpec):
    """Spawn ``n`` ranks of a trainable role; they rendezvous at a port rank 0 picks on its node."""
    return [cls.options(**_options(cfg, plan, pgs, role, r)).remote(spec, r, n) for r in range(n)]


def _init_engines(workers: list) -> list:
    addr, port = ray.get(workers[0].address.remote())
    return [w.init_engine.remote(addr, port) for w in workers]


def trainable_spec(cfg: PPOConfig, role: str, model_path: str) -> TrainableSpec:
    """The spec of a trainable role's workers (``actor`` or ``critic``) built from ``model_path``."""
    name, settings = engine_settings(cfg, role)
    p = cfg.ppo
    loss = PPOLossSettings(clip_low=p.clip_low, clip_high=p.clip_high, dual_clip=p.dual_clip, value_clip=p.value_clip)
    return TrainableSpec(model_path=model_path, engine=name, settings=settings, args=engine_args(cfg, role),
                         loss=loss, threads=cfg.trainer.threads_per_worker)


def frozen_specs(cfg: PPOConfig, paths: ModelPaths, pad_id: int, eos_id: int, plan=None,
                 pgs=None) -> tuple[ReferenceSpec, RewardSpec, RolloutSpec]:
    """The specs of the reference, reward and rollout workers (weights in ``role_dtype``); a vLLM
    rollout's overrides use the placement plan and groups."""
    t, dtype, r = cfg.trainer.threads_per_worker, role_dtype(cfg), cfg.reward
    reference = ReferenceSpec(model_path=paths.reference, temperature=cfg.rollout.temperature, dtype=dtype, threads=t,
                              max_tokens_per_micro_batch=cfg.ppo.max_tokens_per_micro_batch or 0)
    reward = RewardSpec(tokenizer_path=paths.tokenizer, model_path=r.model, function=r.function, metrics=r.metrics,
                        dtype=dtype, allow_local_code=r.allow_local_code, run_dir=os.path.abspath(cfg.run_dir),
                        driver_cwd=os.getcwd(), threads=t,
                        max_tokens_per_micro_batch=cfg.ppo.max_tokens_per_micro_batch or 0)
    vllm = vllm_overrides(cfg, plan, pgs) if cfg.rollout.engine == "vllm" else None
    rollout = RolloutSpec(engine=cfg.rollout.engine, model_path=paths.actor, pad_id=pad_id, eos_id=eos_id, vllm=vllm,
                          dtype=dtype, threads=t)
    return reference, reward, rollout


def spawn(cfg: PPOConfig, paths: ModelPaths, pad_id: int, eos_id: int) -> Workers:
    """Create the placement plan's groups and all workers (no critic when ``ppo.advantage_estimator``
    needs none; its plan slots stay unused); returns once every worker is constructed."""
    plan = make_plan(spec_from_ppo_config(cfg))
    pgs = create_placement_groups(plan)
    ref_spec, reward_spec, rollout_spec = frozen_specs(cfg, paths, pad_id, eos_id, plan, pgs)
    actor = _trainable_group(ActorWorker, cfg, plan, pgs, "actor", cfg.cluster.actor_workers,
                             trainable_spec(cfg, "actor", paths.actor))
    critic = _trainable_group(CriticWorker, cfg, plan, pgs, "critic", cfg.cluster.critic_workers,
                              trainable_spec(cfg, "critic", paths.critic)) if uses_critic(cfg) else []
    reference = ReferenceWorker.options(**_options(cfg, plan, pgs, "reference", 0)).remote(ref_spec)
    reward = RewardWorker.options(**_options(cfg, plan, pgs, "reward", 0)).remote(reward_spec)
    vllm = cfg.rollout.engine == "vllm"  # the vLLM engine actors hold the GPU share, not their driver
    rollout = RolloutWorker.options(**_options(cfg, plan, pgs, "rollout", 0, gpu=not vllm)).remote(rollout_spec)
    w = Workers(actor=actor, critic=critic, reference=reference, reward=reward, rollout=rollout, groups=pgs)
    names = ["actor"] * len(actor) + ["critic"] * len(critic) + ["reference", "reward", "rollout"]
    for name, x in zip(names, w.all()):  # constructor errors surface now, named, and are not retried
        try:
            ray.get(x.pid.remote())
        except ray.exceptions.RayActorError as e:
            if not e.actor_init_failed:
                raise
            shutdown(w, graceful=False)
            raise WorkerStartError(f"the {name} worker failed to start: {_creation_error(e)}") from None
    try:
        ray.get(_init_engines(actor) + (_init_engines(critic) if critic else []))
    except ray.exceptions.RayTaskError as e:  # a checkpoint or layout the engine refuses: named, not retried
        shutdown(w, graceful=False)
        raise WorkerStartError(f"a training engine failed to start: {_creation_error(e)}") from None
    w.weight_sync = WeightSync.open(cfg, actor, rollout)
    return w


def vllm_overrides(cfg: PPOConfig, plan=None, pgs: list | None = None) -> dict:
    """``VLLMEngineConfig`` fields the trainer config sets (``rollout.engine: vllm``); with the
    placement plan and its groups, engine e goes to the plan's bundle of engine e with the GPU
    share of its slot (each TP worker of an engine takes that share of its own GPU)."""
    r = cfg.rollout
    out = dict(num_engines=r.num_engines, tensor_parallel_size=r.tensor_parallel_size, seed=cfg.seed)
    if role_dtype(cfg) == "bfloat16":
        out["dtype"] = "bfloat16"  # the actor's bf16 weights arrive as they are
    if plan is not None:
        out["bundles"] = engine_bundles(plan, pgs)[:r.num_engines]
        out["num_gpus"] = plan.of("rollout")[0].share if plan.spec.gpu else 0.0
    return out


def shutdown(w: Workers | None, graceful: bool = True) -> None:
    """Destroy engines (when ``graceful``), kill every worker, remove the placement groups."""
    if w is None:
        return
    if graceful:
        try:
            ray.get([x.destroy.remote() for x in [*w.actor, *w.critic]], timeout=30)
        except Exception:  # a dead worker cannot destroy its engine; killing it below is enough
            pass
    for x in w.all():
        try:
            ray.kill(x)
        except Exception:
            pass
    for pg in w.groups:
        try:
            remove_placement_group(pg)
        except Exception:
            pass
