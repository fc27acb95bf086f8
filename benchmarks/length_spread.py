"""Training throughput at a realistic response-length spread: padded vs padding-free micro-batches.

Issue 16.2. The PPO update and scoring passes of the 34M-parameter benchmark models (the Llama
policy and value model of ``ppo_vs_trl.py``: hidden 512, 8 layers, 8 heads, built on the spot) run
through ``DeepSpeedTrainEngine`` on one rank, on batches whose response lengths are drawn from

- ``lognormal``: a lognormal with median 64 tokens and sigma 1, clipped to 8-512;
- ``collapsing``: a bimodal mix, 80% short (median 16, sigma 0.3) and a 20% long tail (median 384,
  sigma 0.25), clipped to 8-512, the shape of a batch in the middle of a length collapse;

with prompts of 16-48 tokens. Each side is timed on the same batch, in one run:

- ``padded``: ``ppo.micro_batch_size`` rows per micro-batch, every row padded to the batch's
  longest prompt and response (what ``rlhf train`` does without a token budget);
- ``padding-free``: ``ppo.max_tokens_per_micro_batch`` (rows sorted by length, grouped under the
  budget, each group trimmed of its all-padding columns).

A timed pass is the scoring forward plus one epoch of forward+backward and optimizer steps over
the batch (mini-batches of ``--mini`` rows), for the policy and then the value model. Reported:
seconds, real (non-padding) tokens per second, the ratio padding-free / padded, and MFU: model
FLOPs of the real tokens (``train_flops`` of ``ppo_vs_trl.py`` for the update, a third of it for
the scoring forward) over the time and the matmul peak measured at start
(``rlhf.engines.accelerator.matmul_peak_tflops``, ``--precision``'s dtype, 2048-square).
fp32 by default: on CPUs without AVX512-BF16 bf16 matmuls run far below fp32 (this script's probe
prints both).

    python benchmarks/length_spread.py [--batch 32] [--mini 16] [--micro 4] [--budget 2048]
        [--repeats 2] [--precision fp32|bf16] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ppo_vs_trl import build_models, load_average, train_flops  # noqa: E402


def lengths(kind: str, n: int, g: torch.Generator) -> list[int]:
    """``n`` response lengths of the named spread."""
    z = torch.randn(n, generator=g)
    if kind == "lognormal":
        x = torch.exp(torch.log(torch.tensor(64.0)) + 1.0 * z)
    elif kind == "collapsing":
        long = torch.rand(n, generator=g) < 0.2
        x = torch.where(long, torch.exp(torch.log(torch.tensor(384.0)) + 0.25 * z),
                        torch.exp(torch.log(torch.tensor(16.0)) + 0.3 * z))
    else:
        raise ValueError(kind)
    return x.round().clamp(8, 512).long().tolist()


def make_batch(kind: str, n: int, vocab: int, seed: int = 0):
    from rlhf.engines.base import Generation
    from rlhf.workers.batch import ScoredBatch, collate

    g = torch.Generator().manual_seed(seed)
    gens = []
    for r in lengths(kind, n, g):
        p = int(torch.randint(16, 49, (1,), generator=g))
        gens.append(Generation(torch.randint(3, vocab, (p,), generator=g).tolist(),
                               torch.randint(3, vocab, (r,), generator=g).tolist(), [-1.0] * r, True))
    b = collate(gens, pad_id=0)
    adv = torch.randn(b.mask.shape, generator=g) * b.mask
    old = (torch.randn(b.mask.shape, generator=g) * 0.1 - 5.0) * b.mask
    vals = torch.randn(b.mask.shape, generator=g) * b.mask
    return ScoredBatch.of(b, old_logp=old, old_values=vals, returns=vals + adv, advantages=adv)


def one_pass(model_dir: Path, role: str, batch, a, budget: int) -> float:
    """Seconds of one scoring forward + one epoch of updates (after one untimed warm-up update)."""
    from rlhf.algo import policy_loss, value_loss
    from rlhf.engines.deepspeed_engine import DeepSpeedTrainEngine, EngineSpec, load_hf_model

    B = batch.num_rows
    spec = EngineSpec(lr=1e-6, micro_batch_size=a.micro, grad_accum=a.mini // a.micro,
                      max_tokens_per_micro_batch=budget, bf16=a.precision == "bf16")
    eng = DeepSpeedTrainEngine(load_hf_model(model_dir, role, torch.float32, seed=0), spec, role=role)

    def update(rows):
        sub = batch.select_rows(rows)
        ntok = float(sub.mask.sum())

        def loss_fn(out, s):
            if role == "policy":
                return policy_loss(out["logp"], s.old_logp, s.advantages, s.mask, num_tokens=ntok)
            return value_loss(out["values"], s.old_values, s.returns, s.mask, num_tokens=ntok)

        eng.forward_backward(sub, loss_fn)
        eng.step()

    try:
        update(list(range(a.mini)))  # warm-up: DeepSpeed's first step builds its buffers
        t = time.perf_counter()
        eng.forward(batch)
        for s in range(0, B, a.mini):
            update(list(range(s, min(s + a.mini, B))))
        return time.perf_counter() - t
    finally:
        eng.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32, help="responses per batch")
    ap.add_argument("--mini", type=int, default=16, help="rows per optimizer step")
    ap.add_argument("--micro", type=int, default=4, help="rows per padded micro-batch")
    ap.add_argument("--budget", type=int, default=2048, help="tokens per padding-free micro-batch")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spreads", default="lognormal,collapsing")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}.items():
        os.environ.setdefault(k, v)
    from rlhf.engines.accelerator import matmul_peak_tflops

    peaks = {p: matmul_peak_tflops(d, n=1024) * 1e3 for p, d in (("fp32", "float32"), ("bf16", "bfloat16"))}
    peak = peaks[a.precision]
    print(f"matmul probe ({a.threads} threads, 1024-square): fp32 {peaks['fp32']:.1f} GFLOP/s, "
          f"bf16 {peaks['bf16']:.1f} GFLOP/s; MFU below is of the {a.precision} figure")
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp) / "models", 512, 8, 8, 512)
        vocab = int(__import__("json").loads((models["policy"] / "config.json").read_text())["vocab_size"])
        for kind in a.spreads.split(","):
            batch = make_batch(kind, a.batch, vocab)
            p_len, r_len = batch.row_lengths()
            real = float((p_len + r_len).sum())
            padded_tokens = batch.num_rows * batch.input_ids.shape[1]
            r = sorted(r_len.tolist())
            print(f"\n== {kind}: {a.batch} responses, lengths min {r[0]} median {r[len(r) // 2]} max {r[-1]} "
                  f"mean {statistics.mean(r):.1f}; real tokens {real:.0f} of {padded_tokens} padded "
                  f"({real / padded_tokens:.0%}); load average {load_average()}")
            seq = real / a.batch
            flops = train_flops(models["policy"], real, seq, 1) * (4.0 / 3.0)  # update + scoring forward
            res = {}
            for name, budget in (("padded", 0), ("padding-free", a.budget)):
                times = []
                for _ in range(a.repeats):
                    times.append(one_pass(models["policy"], "policy", batch, a, budget)
                                 + one_pass(models["rm"], "critic", batch, a, budget))
                t = statistics.median(times)
                res[name] = t
                print(f"  {name:13s} {' '.join(f'{x:6.2f}' for x in times)} s -> median {t:6.2f} s, "
                      f"{real / t:7.0f} real tokens/s, MFU {flops / t / (peak * 1e9):.1%}")
            print(f"  [{kind}] padding-free real tokens/s / padded = {res['padded'] / res['padding-free']:.2f}x "
                  f"(target >= 2x)")


if __name__ == "__main__":
    main()
