"""Placement plans, and the plan realised on a simulated 8 nodes x 8 GPUs Ray cluster."""

from __future__ import annotations

import os

import pytest

from rlhf.config import ConfigError, load_config
from rlhf.placement import (ROLES, PlacementError, PlacementSpec, RoleGroup, create_placement_groups, engine_bundles,
                            make_plan, scheduling, spec_from_dict, spec_from_ppo_config)

# the paper's 8 x 8 layout written as a trainer config: what `rlhf train` itself places
PAPER_CLUSTER = ["rollout.engine=vllm", "rollout.num_engines=32", "rollout.tensor_parallel_size=2",
                 "cluster.actor_workers=64", "cluster.critic_workers=64", "cluster.gpus_per_worker=1",
                 "cluster.gpus_per_node=8", "cluster.cpus_per_worker=0.2", "ppo.rollout_batch_size=256",
                 "ppo.mini_batch_size=256", "ppo.micro_batch_size=4"]

SPLIT = PlacementSpec(nodes=8, gpus_per_node=8, vllm_tp=2, zero_stage=3, cpus_per_gpu=1.0, groups=[
    RoleGroup(["actor", "reference"], 16), RoleGroup(["critic", "reward"], 16), RoleGroup(["rollout"], 32)])


def test_colocate_all_paper_layout():
    plan = make_plan(PlacementSpec(vllm_tp=2))
    assert plan.nodes_used == 8 and plan.vllm_engines == 32
    for role in ROLES:
        slots = plan.of(role)
        assert len(slots) == 64 and {(s.node, s.gpu) for s in slots} == {(n, g) for n in range(8) for g in range(8)}
    assert sorted(plan.roles_on(5, 3)) == sorted(ROLES)
    assert all(abs(s.share - 0.2) < 1e-12 for s in plan.slots)
    for e in range(32):
        shards = plan.engine_slots(e)
        assert len({s.node for s in shards}) == 1 and [s.gpu for s in shards] == [2 * e % 8, 2 * e % 8 + 1]
    assert "rollout x32 engines (TP 2)" in plan.describe()


def test_split_layout_and_errors():
    plan = make_plan(SPLIT)
    assert {s.node for s in plan.of("actor")} == {0, 1} and {s.node for s in plan.of("critic")} == {2, 3}
    assert {s.node for s in plan.of("rollout")} == {4, 5, 6, 7} and plan.vllm_engines == 16
    assert plan.roles_on(1, 7) == ["actor", "reference"] and plan.of("actor")[0].share == 0.5
    assert plan.of("rollout")[0].share == 1.0
    bad = [
        (dict(groups=[{"roles": ["actor"], "gpus": 8}]), "role 'rollout' is not placed"),
        (dict(groups=[{"roles": ["actor", "rollout", "actor"], "gpus": 8}]), "already placed"),
        (dict(groups=[{"roles": ["actor", "rollout"], "gpus": 72}]), "72 GPUs requested"),
        (dict(groups=[{"roles": ["actor"], "gpus": 3}, {"roles": ["rollout"], "gpus": 4}], vllm_tp=2),
         "straddle"),
        (dict(vllm_tp=3), "placement.vllm_tp"),
        (dict(groups=[{"roles": ["actor", "rollout", "judge"], "gpus": 8}]),
         r"^placement.groups\[0\].roles\[2\]: must be one of 'actor', .*got 'judge'"),
        (dict(zero_stage=4), r"^placement.zero_stage: must be in \[0, 3\], got 4"),
        (dict(groups=[{"roles": ["actor", "rollout"]}]), r"^placement.groups\[0\].gpus: required"),
        (dict(groups=[{"roles": ["actor", "rollout"], "gpus": 0}]), r"^placement.groups\[0\].gpus: must be >= 1"),
        (dict(gpu_count=3), "placement.gpu_count: unknown key"),
    ]
    for data, msg in bad:
        with pytest.raises(PlacementError, match=msg):
            make_plan(spec_from_dict(data))


def test_spec_from_trainer_config():
    cfg = load_config(None, ["cluster.actor_workers=2", "cluster.critic_workers=2", "ppo.micro_batch_size=4"])
    plan = make_plan(spec_from_ppo_config(cfg))
    assert plan.world_size("actor") == 2 and plan.vllm_engines == 2 and plan.nodes_used == 1
    cfg = load_config(None, ["cluster.colocate=false"])
    plan = make_plan(spec_from_ppo_config(cfg, gpus_per_node=8))
    assert [plan.of(r)[0].gpu for r in ROLES] == [0, 1, 2, 3, 4]
    plan = make_plan(spec_from_ppo_config(load_config(None, PAPER_CLUSTER)))
    assert plan.nodes_used == 8 and plan.vllm_engines == 32 and plan.spec.vllm_tp == 2 and plan.spec.gpu
    assert plan.slots == make_plan(PlacementSpec(vllm_tp=2, zero_stage=0)).slots  # = the paper layout above
    with pytest.raises(ConfigError, match="^cluster: placement.vllm_tp"):  # impossible plans fail at load
        load_config(None, PAPER_CLUSTER + ["cluster.gpus_per_node=3"])


@pytest.mark.slow
def test_plan_lands_on_simulated_8x8_cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 8, "num_gpus": 8, "include_dashboard": False})
    try:
        for _ in range(7):
            cluster.add_node(num_cpus=8, num_gpus=8)
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        cluster.wait_for_nodes()
        assert ray.cluster_resources()["GPU"] == 64

        plan = make_plan(SPLIT)
        pgs = create_placement_groups(plan)
        from ray.util.placement_group import placement_group_table

        # every node placement group sits on one node, and they are 8 different nodes
        pg_node = []
        for pg in pgs:
            nodes = set(placement_group_table(pg)["bundles_to_node_id"].values())
            assert len(nodes) == 1
            pg_node.append(nodes.pop())
        assert len(set(pg_node)) == 8

        @ray.remote
        def probe():
            return (ray.get_runtime_context().get_node_id(), [int(g) for g in ray.get_gpu_ids()],
                    os.environ.get("CUDA_VISIBLE_DEVICES"))

        # one probe per GPU, in the bundle of the first slot the plan puts there (waves of one per node)
        first, seen = {}, {}
        for s in plan.slots:
            first.setdefault((s.node, s.gpu), s)
        for gpu in range(8):
            wave = [first[(n, gpu)] for n in range(8)]
            got = ray.get([probe.options(**scheduling(pgs, s, num_cpus=0.5)).remote() for s in wave])
            for s, (node_id, gpu_ids, visible) in zip(wave, got):
                assert node_id == pg_node[s.node], s
                assert gpu_ids == [s.gpu] and visible == str(s.gpu), (s, gpu_ids, visible)
                seen[(s.node, s.gpu)] = (node_id, gpu_ids[0])
        # every role's slot is one of those bundles; a vLLM engine's TP shards share a physical
        # node, on consecutive GPU ids
        assert all((s.node, s.gpu) in seen for s in plan.slots)
        for e in range(plan.vllm_engines):
            got = [seen[(s.node, s.gpu)] for s in plan.engine_slots(e)]
            assert len({g[0] for g in got}) == 1 and got[1][1] == got[0][1] + 1
        assert [(pgs.index(pg), b) for pg, b in engine_bundles(plan, pgs)] == \
            [(4 + e // 4, 2 * (e % 4)) for e in range(16)]

        # the trainer's own placement (rlhf.workers.group: same plan functions, its worker options)
        from ray.util.placement_group import remove_placement_group

        from rlhf.workers.group import _options, vllm_overrides

        for pg in pgs:
            remove_placement_group(pg)
        cfg = load_config(None, PAPER_CLUSTER)
        plan = make_plan(spec_from_ppo_config(cfg))
        pgs = create_placement_groups(plan)
        node_of = [set(placement_group_table(pg)["bundles_to_node_id"].values()).pop() for pg in pgs]
        wave = [(role, rank) for role, rank in [("actor", 0), ("actor", 13), ("critic", 63), ("reference", 0),
                                                ("reward", 0), ("rollout", 0)]]
        got = ray.get([probe.options(**_options(cfg, plan, pgs, role, rank)).remote() for role, rank in wave])
        for (role, rank), (node_id, gpu_ids, _) in zip(wave, got):
            s = plan.of(role)[rank]
            assert node_id == node_of[s.node] and gpu_ids == [s.gpu], (role, rank, s, gpu_ids)
        vo = vllm_overrides(cfg, plan, pgs)
        assert vo["num_engines"] == 32 and vo["tensor_parallel_size"] == 2 and vo["num_gpus"] == 0.2
        assert [(pgs.index(pg), b) for pg, b in vo["bundles"]] == [(e // 4, 2 * (e % 4)) for e in range(32)]
    finally:
        ray.shutdown()
        cluster.shutdown()
