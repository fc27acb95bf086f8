"""Placement plans: which role runs on which GPU of which node, for 8 nodes x 8 GPUs and up.

A plan is computed from a small spec (nodes, GPUs per node, *role groups* and the vLLM
tensor-parallel size) before anything starts, printed by ``rlhf plan``, and realised on Ray as
one placement group per node (``STRICT_PACK``, one ``{"GPU": 1, "CPU": c}`` bundle per GPU), so
that logical node i of the plan is exactly one physical node and bundle k is GPU k of it.

Role groups are the colocation knob, as in OpenRLHF (``colocate_all`` / ``colocate_actor_ref`` /
split) and veRL (resource pools): every role of a group holds one rank on *each* GPU of the
group and takes ``1 / len(roles)`` of that GPU in Ray's accounting; groups occupy disjoint,
consecutive GPUs (filling node 0 first). Training and inference roles (actor, critic,
reference, reward) have one data-parallel rank per GPU (sharded with the ZeRO stage); the
rollout role has ``gpus / vllm_tp`` vLLM engines, each spanning ``vllm_tp`` consecutive GPUs of
one node (tensor parallelism never crosses a node).

The paper's setting (section 4.1: 8 nodes x 8 GPUs, Megatron) maps to, e.g.,
``groups: [{roles: [actor, critic, reference, reward, rollout], gpus: 64}]``, ``vllm_tp: 2``,
``zero_stage: 3``: 64 ranks per role, 32 vLLM engines. A megatron-core engine would add
tensor / pipeline / expert parallel sizes to the training roles; they regroup ranks inside the
same GPUs, so the plan's GPU assignment does not change.
"""

from __future__ import annotations

import typing
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Literal

from bairlhf.errors import UserError
from bairlhf.typed_config import Range, build

Role = Literal["actor", "critic", "reference", "reward", "rollout"]
"""A role of the placement plan."""
ROLES: tuple[str, ...] = typing.get_args(Role)
REQUIRED_ROLES = ("actor", "rollout")
ONE_UP = Range(1, None)   # >= 1
NONNEG = Range(0, None)   # >= 0


class PlacementError(UserError):
    """An impossible placement; the message names the key."""


@dataclass
class RoleGroup:
    """Roles that share the same GPUs."""

    roles: list[Role]
    """Members, from ``ROLES``; each role appears in exactly one group."""
    gpus: Annotated[int, ONE_UP]
    """GPUs the group holds (consecutive, node-major; >= 1)."""


@dataclass
class PlacementSpec:
    """What the plan is computed from (``placement:`` section of a plan YAML, ``spec_from_dict``)."""

    nodes: Annotated[int, ONE_UP] = 8
    """Nodes in the cluster (>= 1)."""
    gpus_per_node: Annotated[int, ONE_UP] = 8
    """GPUs per node (>= 1)."""
    groups: list[RoleGroup] = field(default_factory=lambda: [RoleGroup(list(ROLES), 64)])
    """Role groups (default: everything colocated on all 64 GPUs)."""
    vllm_tp: Annotated[int, ONE_UP] = 1
    """Tensor-parallel size of each vLLM engine (>= 1, divides ``gpus_per_node``)."""
    zero_stage: Annotated[int, Range(0, 3)] = 3
    """DeepSpeed ZeRO stage of actor / critic, 0-3 (reference / reward shard their weights at stage 3)."""
    cpus_per_gpu: Annotated[float, NONNEG] = 4.0
    """Ray CPUs reserved in each GPU's bundle (>= 0; shared by the roles on that GPU)."""
    cpus_per_role: Annotated[float, NONNEG] | None = None
    """When set, a bundle reserves this many CPUs per role placed on its GPU instead of
    ``cpus_per_gpu`` (the trainer's ``cluster.cpus_per_worker``)."""
    gpu: bool = True
    """Bundles hold a GPU. False: a CPU-only cluster (tests, the CPU demo); the plan is the same,
    processes reserve CPUs only."""


@dataclass(frozen=True)
class Slot:
    """One process of one role: where it runs and how much of the GPU it accounts for."""

    role: str
    """Role name."""
    rank: int
    """Rank within the role (for rollout: engine * vllm_tp + tensor-parallel rank)."""
    node: int
    """Logical node index (placement group index)."""
    gpu: int
    """GPU index on that node (= bundle index = CUDA device id Ray assigns)."""
    share: float
    """Fraction of the GPU in Ray's accounting (1 / roles in the group)."""


@dataclass
class PlacementPlan:
    """The computed placement."""

    spec: PlacementSpec
    slots: list[Slot]
    """Every process of every role."""

    def of(self, role: str) -> list[Slot]:
        """The slots of one role, in rank order."""
        return [s for s in self.slots if s.role == role]

    def world_size(self, role: str) -> int:
        """Ranks of a training / inference role (GPUs of its group)."""
        return len(self.of(role))

    @property
    def vllm_engines(self) -> int:
        return len(self.of("rollout")) // self.spec.vllm_tp

    def engine_slots(self, engine: int) -> list[Slot]:
        """The ``vllm_tp`` slots of one vLLM engine."""
        tp = self.spec.vllm_tp
        return self.of("rollout")[engine * tp:(engine + 1) * tp]

    def roles_on(self, node: int, gpu: int) -> list[str]:
        """Roles sharing one GPU."""
        return [s.role for s in self.slots if s.node == node and s.gpu == gpu]

    @property
    def nodes_used(self) -> int:
        return max(s.node for s in self.slots) + 1

    def describe(self) -> str:
        """A human-readable table: one line per group, then the vLLM layout."""
        lines = [f"cluster: {self.spec.nodes} nodes x {self.spec.gpus_per_node} GPUs, "
                 f"ZeRO-{self.spec.zero_stage}, vLLM TP {self.spec.vllm_tp}"]
        cursor = 0
        for i, g in enumerate(self.spec.groups):
            first, last = cursor, cursor + g.gpus - 1
            cursor += g.gpus
            span = f"node {first // self.spec.gpus_per_node} gpu {first % self.spec.gpus_per_node} .. " \
                   f"node {last // self.spec.gpus_per_node} gpu {last % self.spec.gpus_per_node}"
            parts = []
            for r in g.roles:
                if r == "rollout":
                    parts.append(f"rollout x{g.gpus // self.spec.vllm_tp} engines (TP {self.spec.vllm_tp})")
                else:
                    parts.append(f"{r} x{g.gpus} ranks")
            lines.append(f"group {i}: {g.gpus} GPUs ({span}), {1 / len(g.roles):.2f} GPU each: " + ", ".join(parts))
        return "\n".join(lines)


def make_plan(spec: PlacementSpec) -> PlacementPlan:
    """Lay the groups out on the cluster; raises ``PlacementError`` naming the key.

    Single values (roles, ranges) are in the field types, checked when the spec is built from
    YAML (``spec_from_dict``); the checks here are the ones across fields."""
    gpn = spec.gpus_per_node
    if gpn % spec.vllm_tp:
        raise PlacementError(f"placement.vllm_tp: {spec.vllm_tp} must divide gpus_per_node {gpn}")
    seen: dict[str, int] = {}
    for i, g in enumerate(spec.groups):
        if not g.roles:
            raise PlacementError(f"placement.groups[{i}].roles: empty")
        for r in g.roles:
            if r in seen:
                raise PlacementError(f"placement.groups[{i}].roles: {r!r} already placed in group {seen[r]}")
            seen[r] = i
    for r in REQUIRED_ROLES:
        if r not in seen:
            raise PlacementError(f"placement.groups: role {r!r} is not placed")
    total = sum(g.gpus for g in spec.groups)
    if total > spec.nodes * gpn:
        raise PlacementError(f"placement.groups: {total} GPUs requested, the cluster has {spec.nodes * gpn}")

    slots: list[Slot] = []
    cursor = 0
    for i, g in enumerate(spec.groups):
        share = 1.0 / len(g.roles)
        if "rollout" in g.roles:
            if g.gpus % spec.vllm_tp:
                raise PlacementError(f"placement.groups[{i}].gpus: {g.gpus} is not a multiple of vllm_tp {spec.vllm_tp}")
            if cursor % spec.vllm_tp:
                raise PlacementError(f"placement.groups[{i}]: starts at GPU {cursor}, not aligned to vllm_tp "
                                     f"{spec.vllm_tp} (a vLLM engine would straddle two nodes)")
        for r in g.roles:
            for k in range(g.gpus):
                gid = cursor + k
                slots.append(Slot(role=r, rank=k, node=gid // gpn, gpu=gid % gpn, share=share))
        cursor += g.gpus
    return PlacementPlan(spec=spec, slots=slots)


def spec_from_dict(data: dict) -> PlacementSpec:
    """Build a ``PlacementSpec`` from a YAML mapping (``bairlhf.typed_config.build``: an unknown key,
    an unknown role or a value out of range is an error naming ``placement.<key>``)."""
    return build(PlacementSpec, data, "placement", PlacementError)


def spec_from_ppo_config(cfg, gpus_per_node: int | None = None) -> PlacementSpec:
    """The placement the trainer's own config implies (``rlhf.config.PPOConfig``).

    ``cluster.colocate: true`` -> one group of every role over max(actor, critic, rollout) GPUs;
    ``false`` -> actor, critic on their own GPUs, reference / reward one GPU each, rollout
    ``rollout.num_engines x rollout.tensor_parallel_size`` GPUs. The trainer spawns its workers
    from exactly this plan (``rlhf.workers.group.spawn``): actor / critic rank i on their slot i,
    reference / reward on their first slot, vLLM engine e on ``engine_bundles(plan, pgs)[e]``.
    """
    from rlhf.algo.estimators import get_estimator

    c, r = cfg.cluster, cfg.rollout
    critic = get_estimator(cfg.ppo.advantage_estimator).needs_critic   # critic-free runs place no critic
    roles = [x for x in ROLES if critic or x != "critic"]
    rollout_gpus = r.num_engines * r.tensor_parallel_size
    if c.colocate:
        n = max(c.actor_workers, c.critic_workers if critic else 0, rollout_gpus)
        groups = [RoleGroup(roles, n)]
    else:
        groups = [RoleGroup(["actor"], c.actor_workers), *([RoleGroup(["critic"], c.critic_workers)] if critic else []),
                  RoleGroup(["reference"], 1), RoleGroup(["reward"], 1), RoleGroup(["rollout"], rollout_gpus)]
    total = sum(g.gpus for g in groups)
    gpn = gpus_per_node or c.gpus_per_node or total
    return PlacementSpec(nodes=-(-total // gpn), gpus_per_node=gpn, groups=groups, vllm_tp=r.tensor_parallel_size,
                         zero_stage=cfg.deepspeed.zero_stage, cpus_per_gpu=c.cpus_per_worker * len(roles),
                         cpus_per_role=c.cpus_per_worker, gpu=c.gpus_per_worker > 0)


# ------------------------------------------------------------------------------ Ray

def create_placement_groups(plan: PlacementPlan, timeout_s: float = 120.0) -> list:
    """One ``STRICT_PACK`` placement group per used node, one GPU bundle per GPU; waits until ready."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    tag = uuid.uuid4().hex[:8]  # group names are cluster-unique: runs may share a Ray cluster
    pgs = [placement_group([bundle_resources(plan, n, g) for g in range(plan.spec.gpus_per_node)],
                           strategy="STRICT_PACK", name=f"rlhf-{tag}-node-{n}") for n in range(plan.nodes_used)]
    ready, _ = ray.wait([pg.ready() for pg in pgs], num_returns=len(pgs), timeout=timeout_s)
    if len(ready) != len(pgs):
        for pg in pgs:
            remove_placement_group(pg)
        b = bundle_resources(plan, 0, 0)
        what = (f"{plan.spec.gpus_per_node} free GPUs and {b['CPU'] * plan.spec.gpus_per_node:g} free CPUs each"
                if plan.spec.gpu else f"{b['CPU'] * plan.spec.gpus_per_node:g} free CPUs each (a CPU-only run)")
        raise PlacementError(f"cluster: only {len(ready)} of {len(pgs)} node placement groups became ready in "
                             f"{timeout_s:.0f}s; the plan needs {plan.nodes_used} nodes with {what}")
    return pgs


def bundle_resources(plan: PlacementPlan, node: int, gpu: int) -> dict:
    """What the bundle of one GPU reserves: the GPU (unless CPU-only) and its CPUs."""
    s = plan.spec
    cpus = s.cpus_per_gpu if s.cpus_per_role is None else s.cpus_per_role * max(len(plan.roles_on(node, gpu)), 1)
    return {"GPU": 1.0, "CPU": cpus} if s.gpu else {"CPU": cpus}


def scheduling(pgs: list, slot: Slot, num_cpus: float | None = None, gpu: bool = True) -> dict:
    """Ray ``.options(...)`` that put a process in its slot's bundle with its GPU share
    (``gpu=False``: no GPU, on a CPU-only plan or for a process that holds no model on the GPU)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return dict(num_gpus=slot.share if gpu else 0.0, num_cpus=num_cpus if num_cpus is not None else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pgs[slot.node], placement_group_bundle_index=slot.gpu))


def engine_bundles(plan: PlacementPlan, pgs: list) -> list[tuple]:
    """``(placement_group, first bundle index)`` of every vLLM engine (``VLLMRolloutEngine(bundles=...)``)."""
    return [(pgs[plan.engine_slots(e)[0].node], plan.engine_slots(e)[0].gpu) for e in range(plan.vllm_engines)]
