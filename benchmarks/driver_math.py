"""Serial driver work of one PPO step at the paper's size, before and after the fast path.

The driver (``rlhf.trainer.ppo_step``, step 3) computes token rewards with the KL penalty, GAE
twice (actor lambda and critic lambda), whitens the advantages and runs ``batch_metrics``, all
on the full batch in one process. This measures, on 4096 responses of up to 2,000 tokens
(lengths uniform in [50, 2000], right-padded, as ``metrics_cost.py``):

* before: the previous code, kept below verbatim (``token_rewards``, ``gae`` x2 with one
  ``where`` per carried quantity per token, ``masked_whiten`` built on ``masked_mean``/``masked_var``);
* after: ``rlhf.algo.ppo_advantages`` (mask analysed once, both lambdas in one time-major
  reverse pass, fused whitening), and the same through the separate public calls
  (``token_rewards`` + ``gae_pair`` + ``masked_whiten``);
* ``batch_metrics`` (``rlhf.metrics``, not part of this change) on the same tensors, reported
  separately.

Before and after run interleaved (before, after, before, ...) so machine load hits both alike;
prints medians and minima of the wall time, the median process CPU time (all threads: on a
loaded machine wall time includes waiting for a core, CPU time does not; OpenMP threads that
spin while waiting for each other count in both), the load average (``os.getloadavg``) before
and after, and the largest difference between the two results (0 = bitwise equal).

    python benchmarks/driver_math.py [--batch 4096] [--max-len 2000] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from _common import parse_step_args, step_parser  # benchmarks/ is on sys.path when run as a script
from rlhf import algo
from rlhf.algo.kl import kl_penalty


# ---- the previous implementation (before), verbatim apart from names -------------------------

def legacy_last_token_index(mask):
    present = mask != 0
    empty = ~present.any(dim=1)
    if bool(empty.any()):
        raise ValueError("empty rows")
    T = mask.shape[1]
    return T - 1 - present.flip(1).int().argmax(dim=1)


def legacy_token_rewards(scores, logp, ref_logp, mask, kl_coef, kl_kind="k1"):
    last = legacy_last_token_index(mask)
    on = mask != 0
    kl = kl_penalty(logp, ref_logp, kl_kind)
    kl = torch.where(on, kl, torch.zeros_like(kl))
    rewards = -kl_coef * kl
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


def legacy_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    with torch.no_grad():
        on = (mask != 0).t().contiguous()
        r = rewards.float().t().contiguous()
        v = values.float().t().contiguous()
        T, B = r.shape
        zero = torch.zeros((), dtype=torch.float32, device=r.device)
        next_value = torch.zeros(B, dtype=torch.float32, device=r.device)
        next_adv = torch.zeros_like(next_value)
        adv_tm = torch.zeros_like(r)
        for t in range(T - 1, -1, -1):
            a_t = r[t] + gamma * next_value - v[t] + gamma * lam * next_adv
            m = on[t]
            adv_tm[t] = torch.where(m, a_t, zero)
            next_value = torch.where(m, v[t], next_value)
            next_adv = torch.where(m, a_t, next_adv)
        adv = adv_tm.t().contiguous()
        returns = torch.where(mask != 0, adv + values.float(), zero)
    return adv, returns


def _legacy_masked_sum(x, mask):
    m = mask.to(x.dtype)
    return torch.where(mask != 0, x * m, torch.zeros((), dtype=m.dtype, device=x.device)).sum()


def _legacy_masked_mean(x, mask):
    return _legacy_masked_sum(x, mask) / mask.sum().clamp_min(1.0)


def legacy_masked_whiten(x, mask, eps=1e-8):
    mean = _legacy_masked_mean(x, mask)
    centered = torch.where(mask != 0, x - mean, torch.zeros((), dtype=mean.dtype, device=x.device))
    var = _legacy_masked_mean(centered.pow(2), mask)
    n = mask.sum()
    var = torch.where(n > 1, var * n / (n - 1).clamp_min(1.0), torch.zeros_like(var))
    out = (x - mean) * torch.rsqrt(var + eps)
    return torch.where(mask != 0, out, torch.zeros_like(out))


# ---- the three variants ---------------------------------------------------------------------

KL_COEF, GAMMA, LAM_ACTOR, LAM_CRITIC = 0.01, 1.0, 0.95, 1.0


def before(b):
    rewards, _ = legacy_token_rewards(b["scores"], b["old_logp"], b["ref_logp"], b["mask"], KL_COEF)
    adv, _ = legacy_gae(rewards, b["values"], b["mask"], GAMMA, LAM_ACTOR)
    _, returns = legacy_gae(rewards, b["values"], b["mask"], GAMMA, LAM_CRITIC)
    return adv, returns, legacy_masked_whiten(adv, b["mask"])


def after(b):
    out = algo.ppo_advantages(b["scores"], b["old_logp"], b["ref_logp"], b["values"], b["mask"], kl_coef=KL_COEF,
                              gamma=GAMMA, lam_actor=LAM_ACTOR, lam_critic=LAM_CRITIC)
    return out.advantages, out.returns, out.whitened


def after_separate(b):
    rewards, _ = algo.token_rewards(b["scores"], b["old_logp"], b["ref_logp"], b["mask"], KL_COEF)
    adv, returns = algo.gae_pair(rewards, b["values"], b["mask"], GAMMA, LAM_ACTOR, LAM_CRITIC)
    return adv, returns, algo.masked_whiten(adv, b["mask"])


def make_batch(B: int, T: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tensors of ``metrics_cost.make_batch`` (same generator order, same values)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(50, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    old = -torch.rand(B, T, generator=g) * 3
    return {
        "mask": mask, "lengths": lengths, "finished": lengths < T,
        "scores": torch.randn(B, generator=g),
        "old_logp": old, "ref_logp": old + 0.05 * torch.randn(B, T, generator=g),
        "rollout_logp": old + 1e-3 * torch.randn(B, T, generator=g),
        "new_logp": old + 0.02 * torch.randn(B, T, generator=g),
        "values": torch.randn(B, T, generator=g), "new_values": torch.randn(B, T, generator=g),
    }


CPU: dict[str, list[float]] = {}


def timed(fn, *args, name: str | None = None):
    """Wall time of ``fn(*args)``; its process CPU time (all threads) goes to ``CPU[name]``."""
    c, t = time.process_time(), time.perf_counter()
    out = fn(*args)
    wall = time.perf_counter() - t
    if name is not None:
        CPU.setdefault(name, []).append(time.process_time() - c)
    return wall, out


def run(b: dict, repeats: int, with_metrics: bool = True) -> dict[str, list[float]]:
    """Interleaved timings (seconds) of before / after / after_separate / batch_metrics."""
    from rlhf.metrics import batch_metrics

    times: dict[str, list[float]] = {"before": [], "after": [], "after_separate": [], "batch_metrics": []}
    for _ in range(repeats):
        for name, fn in (("before", before), ("after", after), ("after_separate", after_separate)):
            dt, out = timed(fn, b, name=name)
            times[name].append(dt)
        if with_metrics:
            adv, returns, _ = out
            dt, _ = timed(lambda: batch_metrics(
                mask=b["mask"], scores=b["scores"], finished=b["finished"], old_logp=b["old_logp"],
                ref_logp=b["ref_logp"], rollout_logp=b["rollout_logp"], values=b["values"], returns=returns,
                advantages=adv), name="batch_metrics")
            times["batch_metrics"].append(dt)
    return times


def max_diff(x: tuple, y: tuple) -> float:
    return max(float((a - c).abs().max()) for a, c in zip(x, y))


def main() -> None:
    args = parse_step_args(step_parser(__doc__, repeats=5))
    b = make_batch(args.batch, args.max_len)
    ref, new, sep = before(b), after(b), after_separate(b)   # also warms the allocator
    load0 = os.getloadavg()
    times = run(b, args.repeats)
    load1 = os.getloadavg()
    tokens = int(b["mask"].sum())
    print(f"batch {args.batch} x {args.max_len} ({tokens:,} response tokens), torch threads {torch.get_num_threads()}, "
          f"{args.repeats} interleaved repeats, {os.cpu_count()} CPUs, load average "
          f"{load0[0]:.2f} -> {load1[0]:.2f} (1 min)")
    print("  serial driver work: token rewards + GAE (lam_actor, lam_critic) + whitening"
          "     median      min   CPU s (median, all threads)")
    for name, label in (("before", "before (previous code: 2 masked GAE passes)"),
                        ("after", "after  (ppo_advantages: one pass, both lambdas)"),
                        ("after_separate", "after  (token_rewards + gae_pair + masked_whiten)"),
                        ("batch_metrics", "batch_metrics (other owner; not changed here)")):
        ts = times[name]
        print(f"  {label:<76} {statistics.median(ts):7.3f} s {min(ts):7.3f} s {statistics.median(CPU[name]):7.3f} s")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"speed-up after / before: {med['before'] / med['after']:.2f}x; whole serial driver work "
          f"(after + batch_metrics): {med['after'] + med['batch_metrics']:.3f} s median "
          f"(before + batch_metrics: {med['before'] + med['batch_metrics']:.3f} s)")
    print(f"max |after - before| over advantages, returns, whitened: {max_diff(ref, new):.3g} "
          f"(separate calls: {max_diff(ref, sep):.3g})")


if __name__ == "__main__":
    main()
