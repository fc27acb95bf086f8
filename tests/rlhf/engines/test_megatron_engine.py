"""megatron-core engine on CPU: HF round trip, logprobs / values against transformers, one PPO-like
update across layouts against a plain transformers + AdamW reference, exact save/load.

Every engine runs in processes spawned here (the CUDA shim stays in them). One spawned job of two
gloo ranks per layout (TP2, PP2, DP2 = TP1 with two data-parallel ranks), each job checking both
architectures: a Llama with GQA (4 heads, 2 KV heads, head_dim 32, untied) and a Qwen2 (QKV bias,
tied embeddings, GQA too).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from rlhf import tiny
from rlhf.engines.deepspeed_engine import free_port

ARCHS = ("llama", "qwen2")
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "dp2": (1, 1)}
LR, TEMP, SEED, CLIP = 1e-3, 0.7, 3, 1.0
PROMPT_RESPONSE = [(5, 7), (9, 3), (2, 10), (6, 6)]


def _batch(seed: int = 0):
    """A ``ScoredBatch`` whose ``old_logp`` / ``old_values`` hold noise: the losses below add it to the
    engine's own outputs (detached) to get a ratio / value-clip anchor that differs from them."""
    from rlhf.engines.base import Generation
    from rlhf.workers.batch import ScoredBatch, collate

    g = torch.Generator().manual_seed(seed)
    gens = [Generation(torch.randint(6, 300, (p,), generator=g).tolist(),
                       torch.randint(6, 300, (r,), generator=g).tolist(), [0.0] * r, True)
            for p, r in PROMPT_RESPONSE]
    b = collate(gens, pad_id=5)
    B, T = b.mask.shape
    advantages = torch.randn(B, T, generator=g) * b.mask
    returns = torch.randn(B, T, generator=g) * b.mask
    noise = torch.randn(B, T, generator=g) * 0.05
    return ScoredBatch.of(b, old_logp=noise, old_values=noise, returns=returns, advantages=advantages)


def _policy_loss(out, sub, num_tokens, dp):
    from rlhf.algo import masked_mean, policy_loss

    old = (out["logp"].detach() + sub.old_logp) * sub.mask
    loss, stats = policy_loss(out["logp"], old, sub.advantages, sub.mask, num_tokens=num_tokens,
                              dp_world_size=dp)
    stats["entropy"] = masked_mean(out["entropy"].detach(), sub.mask)
    return loss, stats


def _value_loss(out, sub, num_tokens, dp):
    from rlhf.algo import value_loss

    old = (out["values"].detach() + sub.old_values) * sub.mask
    return value_loss(out["values"], old, sub.returns, sub.mask, clip=0.2, num_tokens=num_tokens,
                      dp_world_size=dp)


def _rows(batch, rows):
    return batch.select_rows(rows)


# ----------------------------------------------------------------------------- the spawned job

def _job(rank: int, world: int, port: int, layout: str, models: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK="0")
    torch.set_num_threads(1)
    import torch.distributed as dist
    from safetensors.torch import save_file

    from rlhf.engines.deepspeed_engine import init_distributed

    init_distributed()  # one world group for all the engines of this job (each engine leaves it alone)

    from rlhf.engines.megatron import MegatronEngine, cuda_shim
    from rlhf.engines.megatron.hf_mapping import MegatronEngineError

    tp, pp = LAYOUTS[layout]
    settings = type("S", (), {"tensor_parallel": tp, "pipeline_parallel": pp, "distributed_optimizer": True,
                              "recompute": layout == "pp2", "bf16": False})()
    o = Path(out)
    batch = _batch()
    ntok = float(batch.mask.sum())
    rec: dict = {"shim": None}

    def make(d, role):
        return MegatronEngine(d, role, settings, lr=LR, warmup_steps=2, micro_batch_size=1 if layout == "dp2" else 2,
                              seed=SEED, temperature=TEMP, grad_clip=CLIP)

    def update(e, loss):
        n = len(PROMPT_RESPONSE) // e.dp_size
        sub = _rows(batch, range(e.dp_rank * n, (e.dp_rank + 1) * n))
        records = e.forward_backward(sub, lambda out_, s: loss(out_, s, ntok, e.dp_size))
        grads = dict(e.export_gradients())
        return records, grads, e.step()

    for arch, d in models.items():
        r = rec[arch] = {}
        e = make(d, "policy")
        rec["shim"] = cuda_shim.applied()
        r["dp"] = [e.dp_rank, e.dp_size]
        r["opt_sharded"] = e._shard is not None  # our ZeRO-1 at DP > 1 (distributed_optimizer: true)
        w0 = dict(e.export_weights())
        fwd = e.forward(batch)
        e.save_pretrained(o / f"{arch}_policy_hf")
        records, grads, st = update(e, _policy_loss)
        w1 = dict(e.export_weights())
        e.save_state(o / f"{arch}_state")
        _, _, st2 = update(e, _policy_loss)
        w2 = dict(e.export_weights())
        e.destroy()
        e = make(d, "policy")  # a fresh engine resumes from the saved state
        e.load_state(o / f"{arch}_state")
        _, _, st2b = update(e, _policy_loss)
        w2b = dict(e.export_weights())
        e.destroy()
        r.update(policy_records=records, policy_step=st, step2=st2, step2_after_load=st2b,
                 resume_exact=all(torch.equal(w2[k], w2b[k]) for k in w2))
        tensors = {f"w0/{k}": v for k, v in w0.items()}
        tensors.update({f"w1/{k}": v for k, v in w1.items()})
        tensors.update({f"g/{k}": v for k, v in grads.items()})
        tensors.update({f"fwd/{k}": v for k, v in fwd.items()})

        c = make(d, "critic")
        vals = c.values(batch)
        c.save_pretrained(o / f"{arch}_critic_hf")
        crecords, cgrads, cst = update(c, _value_loss)
        cw1 = dict(c.export_weights())
        try:
            c.load_state(o / f"{arch}_state")
            r["critic_refused_policy_state"] = False
        except MegatronEngineError as err:
            r["critic_refused_policy_state"] = "layout" in str(err)
        c.destroy()
        c = make(o / f"{arch}_critic_hf", "critic")  # its own HF checkpoint (score.weight on disk) loads back
        r["critic_reload_exact"] = bool(torch.equal(c.values(batch), vals))
        c.destroy()
        r.update(critic_records=crecords, critic_step=cst)
        tensors["values"] = vals
        tensors.update({f"cg/{k}": v for k, v in cgrads.items()})
        tensors.update({f"cw1/{k}": v for k, v in cw1.items()})
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(o / f"{arch}_r{rank}.safetensors"))
    (o / f"rank{rank}.json").write_text(json.dumps(rec))
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- references (this process)

def _reference(d: Path) -> dict:
    """What the DeepSpeed path computes on the same weights: transformers forward (policy_logits /
    critic_values), the same losses over the whole batch, fused AdamW step after clipping."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf.algo import entropy_from_logits, logprobs_from_logits
    from rlhf.workers.model_workers import critic_values, policy_logits

    batch = _batch()
    ntok = float(batch.mask.sum())
    ref: dict = {}
    pol = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    torch.manual_seed(SEED)
    cri = AutoModelForSequenceClassification.from_pretrained(str(d), num_labels=1, dtype=torch.float32)
    for name, model, fwd, loss in (("policy", pol, "logits", _policy_loss), ("critic", cri, "values", _value_loss)):
        ref[f"{name}_w0"] = {k: v.detach().clone() for k, v in model.named_parameters()}  # tied: once
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2))
        if name == "policy":
            logits = policy_logits(model, batch, TEMP)
            out = {"logp": logprobs_from_logits(logits, batch.responses) * batch.mask,
                   "entropy": entropy_from_logits(logits) * batch.mask}
        else:
            out = {"values": critic_values(model, batch) * batch.mask}
        ref[f"{name}_out"] = {k: v.detach().clone() for k, v in out.items()}
        total, _ = loss(out, batch, ntok, 1)
        total.backward()
        ref[f"{name}_loss"] = float(total.detach())
        ref[f"{name}_grads"] = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        norm = float(torch.stack([p.grad.norm() for p in model.parameters()]).norm())
        ref[f"{name}_norm"] = norm
        coef = CLIP / (norm + 1e-6)
        if coef < 1:
            for p in model.parameters():
                p.grad.mul_(coef)
        opt.step()
        sched.step()
        ref[f"{name}_w1"] = {k: v.detach().clone() for k, v in model.named_parameters()}
    return ref


@pytest.fixture(scope="module")
def gqa_models(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("megatron_models")
    kw = dict(tokenizer=tokenizer, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=192)
    return {"llama": tiny.make_tiny_model(root / "llama", arch="llama", **kw),
            "qwen2": tiny.make_tiny_model(root / "qwen2", arch="qwen2", tie_word_embeddings=True, **kw)}


@pytest.fixture(scope="module")
def references(gqa_models):
    return {arch: _reference(d) for arch, d in gqa_models.items()}


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in b)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_megatron_engine_layout(layout, gqa_models, references, tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out = tmp_path / "out"
    out.mkdir()
    sys.path.insert(0, str(Path(__file__).parent))  # the spawned ranks import this module by name
    mp.spawn(_job, args=(2, free_port(), layout, {a: str(d) for a, d in gqa_models.items()}, str(out)),
             nprocs=2, join=True)
    from rlhf.engines.megatron import cuda_shim

    assert not cuda_shim.applied() and torch.Tensor.cuda is not cuda_shim._tensor_cuda  # confined to the ranks
    recs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert recs[0]["shim"] == (not torch.cuda.is_available())
    batch = _batch()
    m = batch.mask.bool()
    for arch in ARCHS:
        ref = references[arch]
        res = [load_file(str(out / f"{arch}_r{r}.safetensors")) for r in range(2)]
        part = lambda t, pre: {k[len(pre):]: v for k, v in t.items() if k.startswith(pre)}  # noqa: E731
        hf_policy = {k: v for k, v in ref["policy_w0"].items()}
        print(f"{layout} {arch}: logp {float((res[0]['fwd/logp'] - ref['policy_out']['logp'])[m].abs().max()):.2e} "
              f"entropy {float((res[0]['fwd/entropy'] - ref['policy_out']['entropy'])[m].abs().max()):.2e} "
              f"values {float((res[0]['values'] - ref['critic_out']['values'])[m].abs().max()):.2e} "
              f"grads {_max_diff(part(res[0], 'g/'), ref['policy_grads']):.2e} "
              f"critic grads {_max_diff(part(res[0], 'cg/'), ref['critic_grads']):.2e} "
              f"w1 {_max_diff(part(res[0], 'w1/'), ref['policy_w1']):.2e} "
              f"grad_norm {abs(recs[0][arch]['policy_step']['grad_norm'] - ref['policy_norm']):.2e}")
        for r in range(2):
            w0 = part(res[r], "w0/")
            # HF -> megatron -> HF, bit-exact, on every rank; same names (no lm_head when tied)
            assert set(w0) == set(hf_policy), (arch, layout, set(w0) ^ set(hf_policy))
            assert all(torch.equal(w0[k], hf_policy[k]) for k in w0), (arch, layout)
            # logprobs / entropy / values against transformers (fp32)
            assert float((res[r]["fwd/logp"] - ref["policy_out"]["logp"])[m].abs().max()) < 1e-5
            assert float((res[r]["fwd/entropy"] - ref["policy_out"]["entropy"])[m].abs().max()) < 1e-5
            assert float((res[r]["values"] - ref["critic_out"]["values"])[m].abs().max()) < 1e-5
            # one PPO-like update: gradients, grad norm, loss, new weights
            assert _max_diff(part(res[r], "g/"), ref["policy_grads"]) < 1e-5, (arch, layout)
            assert _max_diff(part(res[r], "cg/"), ref["critic_grads"]) < 1e-5, (arch, layout)
            # AdamW's first step moves a weight by ~lr * g / (|g| + eps): where |g| is ~eps, a 1e-8
            # gradient difference moves the update by a fraction of lr, so weights after the step get
            # lr / 10 (the gradients themselves are held to 1e-5 above)
            assert _max_diff(part(res[r], "w1/"), ref["policy_w1"]) < LR / 10, (arch, layout)
            assert _max_diff(part(res[r], "cw1/"), ref["critic_w1"]) < LR / 10, (arch, layout)
            rr = recs[r][arch]
            assert abs(rr["policy_step"]["grad_norm"] - ref["policy_norm"]) < 1e-5 * max(1.0, ref["policy_norm"])
            assert abs(rr["critic_step"]["grad_norm"] - ref["critic_norm"]) < 1e-5 * max(1.0, ref["critic_norm"])
            assert abs(rr["policy_step"]["lr"] - LR) < 1e-12
            loss = sum(x["loss"] for x in rr["policy_records"])
            closs = sum(x["loss"] for x in rr["critic_records"])
            if layout == "dp2":  # each rank's loss is its share times dp_size
                loss = (loss + sum(x["loss"] for x in recs[1 - r][arch]["policy_records"])) / 2
                closs = (closs + sum(x["loss"] for x in recs[1 - r][arch]["critic_records"])) / 2
            assert abs(loss - ref["policy_loss"]) < 1e-5 and abs(closs - ref["critic_loss"]) < 1e-5
            # exact resume: the step after load_state equals the step without it, bit for bit
            assert rr["resume_exact"] and rr["step2"] == rr["step2_after_load"]
            assert rr["critic_refused_policy_state"] and rr["critic_reload_exact"]
            assert rr["opt_sharded"] == (layout == "dp2") and rr["dp"] == ([r, 2] if layout == "dp2" else [0, 1])
        # save_pretrained writes ordinary HF checkpoints
        pol = AutoModelForCausalLM.from_pretrained(str(out / f"{arch}_policy_hf"), dtype=torch.float32)
        assert all(torch.equal(pol.state_dict()[k], v) for k, v in hf_policy.items())
        cri = AutoModelForSequenceClassification.from_pretrained(str(out / f"{arch}_critic_hf"), num_labels=1,
                                                                 dtype=torch.float32)
        assert all(torch.equal(cri.state_dict()[k], v) for k, v in ref["critic_w0"].items())
