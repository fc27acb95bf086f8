"""Placement groups and the set of Ray workers one PPO run uses.

``cluster.colocate: true`` puts every role in one placement group whose bundle i hosts actor rank
i, critic rank i (and, on bundle 0, the reference, reward and rollout workers), each taking a
fraction of the bundle (OpenRLHF's "colocate all" / veRL's hybrid layout). ``false`` gives each
role its own placement group, one bundle per rank. Both use the PACK strategy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf.config import PPOConfig
from rlhf.engines.deepspeed_engine import EngineSpec
from rlhf.workers.model_workers import (ActorWorker, CriticWorker, ReferenceWorker, RewardWorker,
                                        RolloutWorker)

FROZEN_ROLES = ("reference", "reward", "rollout")


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
    critic: list
    reference: object
    reward: object
    rollout: object
    groups: list = field(default_factory=list)

    def all(self) -> list:
        return [*self.actor, *self.critic, self.reference, self.reward, self.rollout]


def _bundles(cfg: PPOConfig) -> dict[str, tuple]:
    """role -> (placement group index, [bundle per rank]) and the groups' bundle specs."""
    c = cfg.cluster
    n = max(c.actor_workers, c.critic_workers)
    if c.colocate:
        per = {"CPU": c.cpus_per_worker * 2}
        specs = [[dict(per) for _ in range(n)]]
        specs[0][0]["CPU"] += c.cpus_per_worker * len(FROZEN_ROLES)
        if c.gpus_per_worker:
            for b in specs[0]:
                b["GPU"] = c.gpus_per_worker
        place = {"actor": (0, list(range(c.actor_workers))), "critic": (0, list(range(c.critic_workers)))}
        place.update({r: (0, [0]) for r in FROZEN_ROLES})
        return {"specs": specs, "place": place}
    counts = {"actor": c.actor_workers, "critic": c.critic_workers, **{r: 1 for r in FROZEN_ROLES}}
    specs, place = [], {}
    for i, (role, k) in enumerate(counts.items()):
        b = {"CPU": c.cpus_per_worker}
        if c.gpus_per_worker:
            b["GPU"] = c.gpus_per_worker
        specs.append([dict(b) for _ in range(k)])
        place[role] = (i, list(range(k)))
    return {"specs": specs, "place": place}


def _gpu_share(cfg: PPOConfig) -> float:
    g = cfg.cluster.gpus_per_worker
    return g / (2 + len(FROZEN_ROLES)) if cfg.cluster.colocate else g


def _options(cfg, pgs, place, role, rank):
    gi, bundles = place[role]
    return dict(num_cpus=cfg.cluster.cpus_per_worker, num_gpus=_gpu_share(cfg),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pgs[gi], placement_group_bundle_index=bundles[rank]))


def engine_spec(cfg: PPOConfig, lr: float, world: int) -> EngineSpec:
    p, o = cfg.ppo, cfg.optim
    local_mini = p.mini_batch_size // world
    return EngineSpec(lr=lr, warmup_steps=o.warmup_steps, weight_decay=o.weight_decay, betas=tuple(o.betas),
                      grad_clip=o.grad_clip, zero_stage=cfg.deepspeed.zero_stage, bf16=cfg.deepspeed.bf16,
                      micro_batch_size=p.micro_batch_size, grad_accum=local_mini // p.micro_batch_size)


def _trainable_group(cls, cfg, pgs, place, role, n, make_args):
    """Spawn ``n`` ranks of a trainable role; they rendezvous at a port rank 0 picks on its node."""
    workers = [cls.options(**_options(cfg, pgs, place, role, r)).remote(*make_args(r, n)) for r in range(n)]
    return workers


def _init_engines(workers: list) -> list:
    addr, port = ray.get(workers[0].address.remote())
    return [w.init_engine.remote(addr, port) for w in workers]


def spawn(cfg: PPOConfig, paths: ModelPaths, pad_id: int, eos_id: int) -> Workers:
    """Create placement groups and all workers; returns once every worker is constructed."""
    layout = _bundles(cfg)
    pgs = [placement_group(spec, strategy="PACK") for spec in layout["specs"]]
    ray.get([pg.ready() for pg in pgs])
    place, t = layout["place"], cfg.trainer.threads_per_worker
    ppo = {"clip_low": cfg.ppo.clip_low, "clip_high": cfg.ppo.clip_high, "dual_clip": cfg.ppo.dual_clip,
           "value_clip": cfg.ppo.value_clip}
    temp = cfg.rollout.temperature
    actor = _trainable_group(ActorWorker, cfg, pgs, place, "actor", cfg.cluster.actor_workers,
                             lambda r, n: (paths.actor, engine_spec(cfg, cfg.optim.actor_lr, n), r, n, ppo, temp, t))
    critic = _trainable_group(CriticWorker, cfg, pgs, place, "critic", cfg.cluster.critic_workers,
                              lambda r, n: (paths.critic, engine_spec(cfg, cfg.optim.critic_lr, n), r, n, ppo,
                                            cfg.seed, t))
    reference = ReferenceWorker.options(**_options(cfg, pgs, place, "reference", 0)).remote(paths.reference, temp, t)
    reward = RewardWorker.options(**_options(cfg, pgs, place, "reward", 0)).remote(
        paths.tokenizer, cfg.reward.model, cfg.reward.function, t, cfg.reward.metrics)
    rollout = RolloutWorker.options(**_options(cfg, pgs, place, "rollout", 0)).remote(
        cfg.rollout.engine, paths.actor, pad_id, eos_id, t)
    w = Workers(actor=actor, critic=critic, reference=reference, reward=reward, rollout=rollout, groups=pgs)
    ray.get(_init_engines(actor) + _init_engines(critic) + [x.pid.remote() for x in w.all()])  # errors surface now
    return w


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
