"""Cost of the per-step metrics and detectors against the step's own tensor work.

One PPO step of the paper's size: 4096 responses of up to 2,000 tokens (lengths uniform in
[50, 2000], right-padded). The *peer* is the driver-side PPO math the step must do anyway on
the same tensors (token rewards with the KL penalty, GAE for actor and critic, advantage
whitening) plus the policy and value losses over the whole batch; it is a lower bound on the
step. A second peer is the policy head's log-softmax work the trainer does for every response
token (``logprobs_from_logits`` + ``entropy_from_logits`` on [rows, T, V] logits), measured on
``--head-rows`` rows and scaled to the batch by rows (the trainer runs it micro-batch by
micro-batch; a step runs it at least three times, for old, reference and training logprobs, and
the transformer layers and generation come on top: both peers are lower bounds). The measured
side is everything this package adds: ``batch_metrics`` (length, buckets, KL, mismatch,
critic statistics), ``StabilityMonitor.update`` with a 3,000-step history (the end of a long
run, its worst case: every detector re-runs on the whole history, 20 buckets included) and
``MetricLogger.log`` (JSONL + TensorBoard). Prints medians and the ratio.

The driver's own serial math (rewards, both GAE passes, whitening) is also timed before (the
previous code, kept in ``driver_math.py``) and after (``rlhf.algo.ppo_advantages``), next to
``batch_metrics``; ``benchmarks/driver_math.py`` measures the same interleaved with more detail.

    python benchmarks/metrics_cost.py [--batch 4096] [--max-len 2000] [--history 3000] [--repeats 3]
                                      [--vocab 32000] [--head-rows 1] [--threads 2]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import numpy as np
import torch
from tqdm import tqdm

from _common import parse_step_args, step_parser
from driver_math import after as driver_after  # benchmarks/ is on sys.path when run as a script
from driver_math import before as driver_before
from driver_math import make_batch
from rlhf import algo
from rlhf.metrics import MetricLogger, StabilityMonitor, batch_metrics


def step_math(b: dict) -> dict:
    """The step's own PPO tensor work (the peer): the driver's rewards, GAE for both lambdas and
    whitening (``algo.ppo_advantages``), then the policy and value losses over the whole batch."""
    adv, returns, white = driver_after(b)
    algo.policy_loss(b["new_logp"], b["old_logp"], white, b["mask"], 0.2, 0.28)
    algo.value_loss(b["new_values"], b["values"], returns, b["mask"], 0.2)
    return {"advantages": adv, "returns": returns}


def history(n: int, seed: int = 0) -> list[dict]:
    """A long synthetic run: a length collapse and a hockey stick in the overall and bucket rewards."""
    rng = np.random.default_rng(seed)
    recs = []
    for s in range(n):
        r = {"rollout/length_mean": (1000 if s < 20 else 400) + rng.normal(0, 10),
             "reward/mean": float(np.interp(s, [0, 10, 30, 80, 400], [0, 0, -1, -1, 0.5]) + rng.normal(0, 0.02)),
             "reward/std": 1.0}
        for i in range(20):
            r[f"reward/bucket_{i:02d}_mean"] = r["reward/mean"] + rng.normal(0, 0.1)
            r[f"reward/bucket_{i:02d}_count"] = 200.0
        recs.append(r)
    return recs


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = step_parser(__doc__, repeats=3)
    ap.add_argument("--history", type=int, default=3000)
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary of the head peer (Llama-2: 32000)")
    ap.add_argument("--head-rows", type=int, default=1, help="rows per measured head micro-batch")
    args = parse_step_args(ap)
    torch.manual_seed(0)
    b = make_batch(args.batch, args.max_len)
    out = step_math(b)
    monitor = StabilityMonitor()
    recs = history(args.history)
    for s, r in enumerate(tqdm(recs[:-1], desc="filling detector history", unit="step")):
        monitor.update(s, r)
    state = monitor.state_dict()
    last = len(recs) - 1

    def metrics_once():
        return batch_metrics(mask=b["mask"], scores=b["scores"], finished=b["finished"], old_logp=b["old_logp"],
                             ref_logp=b["ref_logp"], rollout_logp=b["rollout_logp"], values=b["values"],
                             returns=out["returns"], advantages=out["advantages"])

    def detectors_once():
        monitor.load_state_dict(state)
        return monitor.update(last, recs[last])

    with tempfile.TemporaryDirectory() as d:
        logger = MetricLogger(d)
        record = {**metrics_once(), **detectors_once()}
        step_counter = iter(range(10**6))
        t_log = median_time(lambda: logger.log(next(step_counter), record), args.repeats)
        logger.close()
    t_step = median_time(lambda: step_math(b), args.repeats)
    logits = torch.randn(args.head_rows, args.max_len, args.vocab)
    labels = torch.randint(0, args.vocab, (args.head_rows, args.max_len))
    t_head_rows = median_time(lambda: (algo.logprobs_from_logits(logits, labels),
                                       algo.entropy_from_logits(logits)), args.repeats)
    del logits
    t_head = t_head_rows * args.batch / args.head_rows
    t_driver_before = median_time(lambda: driver_before(b), args.repeats)
    t_driver_after = median_time(lambda: driver_after(b), args.repeats)
    t_metrics = median_time(metrics_once, args.repeats)
    t_detect = median_time(detectors_once, args.repeats)
    added = t_metrics + t_detect + t_log
    tokens = int(b["mask"].sum())
    print(f"batch {args.batch} x {args.max_len} ({tokens:,} response tokens), detector history {args.history} steps, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} (1 min, "
          f"{os.cpu_count()} CPUs)")
    print(f"  step PPO math (peer: rewards, 2x GAE, whiten, losses)  {t_step * 1e3:9.1f} ms")
    print(f"  driver rewards+2xGAE+whiten, before (previous code)    {t_driver_before * 1e3:9.1f} ms")
    print(f"  driver rewards+2xGAE+whiten, after (ppo_advantages)    {t_driver_after * 1e3:9.1f} ms")
    print(f"  batch_metrics                                          {t_metrics * 1e3:9.1f} ms")
    print(f"  serial driver work (after + batch_metrics)             {(t_driver_after + t_metrics) * 1e3:9.1f} ms")
    print(f"  StabilityMonitor.update (22 series x {args.history} steps)    {t_detect * 1e3:9.1f} ms")
    print(f"  MetricLogger.log (JSONL + TensorBoard, {len(record)} metrics)   {t_log * 1e3:9.1f} ms")
    scale = f"{args.head_rows} row(s) measured x {args.batch // args.head_rows}"
    print(f"  policy head log-softmax, V={args.vocab} (peer; {scale}) {t_head * 1e3:9.1f} ms")
    print(f"ratio metrics+detectors+logging / step PPO math: {added / t_step:.3f}")
    print(f"ratio metrics+detectors+logging / policy-head log-softmax (one pass): {added / t_head:.5f}")


if __name__ == "__main__":
    main()
