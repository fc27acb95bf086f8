"""The single-controller PPO loop: `rlhf train CONFIG.yaml [key.sub=value ...] [--resume RUN_DIR]`.

Read top to bottom: ``cli_main`` parses the command line; ``train`` prepares the run directory
(models built or merged, config resolved), starts the Ray workers, restores the last checkpoint
when resuming, then calls ``ppo_step`` once per step. A step samples prompts, generates, scores
(actor, reference, critic, reward), computes token rewards and GAE on the driver, trains actor
and critic over mini-batches, pushes the new actor weights to the rollout engine, logs metrics
and checkpoints every K steps. A Ray worker that dies restarts the workers from the last
checkpoint (bounded retries); a non-finite loss stops the run with its last checkpoint intact.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rlhf.config import ConfigError, PPOConfig, load_config, save_config
from rlhf.data import PromptSampler, encode_prompts, load_prompts

NON_DETERMINISTIC_PREFIXES = ("timing/", "perf/")


class RunStopped(RuntimeError):
    """The run stopped on purpose (failed rollout check, non-finite values, too many restarts)."""


# ----------------------------------------------------------------------------- run directory

@dataclass
class LoopState:
    """Everything beyond the engines that an exact resume restores."""

    step: int
    """Steps completed."""
    sampler: PromptSampler
    """Data position."""
    kl_coef: float
    """Current KL coefficient (adaptive controller)."""
    monitor: object
    """``rlhf.metrics.StabilityMonitor`` (detector state)."""


def resolve_models(cfg: PPOConfig, run_dir: Path):
    """Model directories of the run: build the tiny models or run the BAI merge on first use."""
    from rlhf.workers.group import ModelPaths

    m = cfg.model
    actor = m.actor
    if m.bai_recipe is not None:
        actor = str(run_dir / "models" / "bai_actor")
        if not Path(actor).exists():
            from bai.config import MergeError, load_config as load_merge_config
            from bai.merge import merge

            try:
                if load_merge_config(m.bai_recipe).sweep:
                    raise ConfigError(f"model.bai_recipe: {m.bai_recipe} is a sweep; PPO needs one merge "
                                      "(`rlhf sweep` runs one PPO job per ratio)")
                merge(m.bai_recipe, actor)
            except MergeError as e:
                raise ConfigError(f"model.bai_recipe: {e}") from e
            shutil.copy(m.bai_recipe, run_dir / "bai_recipe.yaml")  # the run records its recipe
    elif actor == "tiny":
        actor = str(run_dir / "models" / "tiny_actor")
        if not Path(actor).exists():
            from rlhf import tiny

            t = m.tiny
            tok = tiny.train_tokenizer(template=t.template)
            tmp = Path(actor + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tiny.make_tiny_model(tmp, arch=t.arch, tokenizer=tok, seed=t.seed, hidden_size=t.hidden_size,
                                 num_layers=t.num_layers, num_heads=t.num_heads)
            tmp.rename(actor)
    critic = m.critic or cfg.reward.model or actor
    return ModelPaths(actor=actor, reference=m.reference or actor, critic=critic, tokenizer=m.tokenizer or actor)


def check_inputs(cfg: PPOConfig, paths) -> None:
    """Refuse bad inputs before any work: missing weights, pickles, a reward tokenizer that differs."""
    from transformers import AutoTokenizer

    for key, p in [("model.actor", paths.actor), ("model.reference", paths.reference), ("model.critic", paths.critic),
                   ("reward.model", cfg.reward.model)]:
        if p is None:
            continue
        files = [f.name for f in Path(p).glob("*")]
        if not any(f.endswith(".safetensors") for f in files):
            has_bin = any(f.endswith(".bin") for f in files)
            if not (has_bin and cfg.model.allow_pickle):
                why = "only pickled .bin weights (set model.allow_pickle: true)" if has_bin else "no model weights"
                raise ConfigError(f"{key}: {p} holds {why}")
    if cfg.reward.model is not None:
        ours = AutoTokenizer.from_pretrained(paths.tokenizer).get_vocab()
        theirs = AutoTokenizer.from_pretrained(cfg.reward.model).get_vocab()
        if ours != theirs:
            raise ConfigError(f"reward.model: tokenizer of {cfg.reward.model} differs from the actor's "
                              f"({len(theirs)} vs {len(ours)} tokens)")


# ----------------------------------------------------------------------------- checkpoints

def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- one PPO step

def split(n: int, world: int) -> list[list[int]]:
    """Contiguous row shards, one per data-parallel rank."""
    k = n // world
    return [list(range(r * k, (r + 1) * k)) for r in range(world)]


def make_plans(cfg: PPOConfig, step: int, mask: torch.Tensor, world: int) -> list[list]:
    """Per rank: for each epoch, the (rows, global mini-batch token count) of each mini-batch.

    Rows are shuffled per epoch with a generator seeded by (seed, step, epoch), so a resumed run
    trains on the same mini-batches. Each mini-batch is split contiguously over the ranks.
    """
    B, mb = mask.shape[0], cfg.ppo.mini_batch_size
    plans: list[list] = [[] for _ in range(world)]
    for epoch in range(cfg.ppo.ppo_epochs):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 101 + epoch)
        perm = torch.randperm(B, generator=g).tolist()
        per_rank: list[list] = [[] for _ in range(world)]
        for i in range(0, B, mb):
            rows = perm[i:i + mb]
            ntok = float(mask[rows].sum())
            for r, shard in enumerate(split(len(rows), world)):
                per_rank[r].append(([rows[j] for j in shard], ntok))
        for r in range(world):
            plans[r].append(per_rank[r])
    return plans


def fetch(refs: list) -> list:
    """``ray.get`` that raises as soon as any call fails: a dead rank must not leave the driver
    waiting on its peers, which would sit in a collective until the gloo/nccl timeout."""
    import ray

    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
    return ray.get(list(refs))


def ppo_step(cfg: PPOConfig, w, state: LoopState, prompt_ids: list[list[int]], pad_id: int) -> dict[str, float]:
    """One PPO step; returns its metrics. Mutates ``state`` (step, data position, KL coefficient)."""
    import ray

    from rlhf.algo import adaptive_kl_coef, gae, masked_whiten, token_rewards, truncated_is_weights
    from rlhf.engines.base import SamplingParams
    from rlhf.metrics import ACTOR_STAT_NAMES, CRITIC_STAT_NAMES, batch_metrics, reduce_update_stats
    from rlhf.workers.batch import collate

    p, r = cfg.ppo, cfg.rollout
    step = state.step
    t0 = time.perf_counter()
    # 1. sample prompts and generate
    idx = state.sampler.next(p.rollout_batch_size)
    prompts = [prompt_ids[i] for i in idx for _ in range(p.n_samples_per_prompt)]
    params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                            top_k=r.top_k, seed=cfg.seed * 1_000_003 + step)
    gens = ray.get(w.rollout.generate.remote(prompts, params))
    batch = collate(gens, pad_id)
    mask, B = batch["mask"], len(gens)
    finished = torch.tensor([g.finished for g in gens])
    t1 = time.perf_counter()

    # 2. score: trainer logprobs (the old policy; with old_logp_source rollout only at step 0, for the
    #    rollout-vs-trainer check), reference logprobs, values, reward
    bref = ray.put(batch)
    a_shards, c_shards = split(B, len(w.actor)), split(B, len(w.critic))
    rescore = p.old_logp_source == "trainer" or step == 0
    lp_refs = [a.logprobs.remote(bref, rows, r.top_k, r.top_p) for a, rows in zip(w.actor, a_shards)] if rescore else []
    v_refs = [c.values.remote(bref, rows) for c, rows in zip(w.critic, c_shards)]
    ref_ref = w.reference.logprobs.remote(bref)
    score_ref = w.reward.score.remote(bref, [g.prompt_ids for g in gens], [g.response_ids for g in gens],
                                      finished.tolist())
    *lp, ref_logp, raw_scores = fetch(lp_refs + [ref_ref, score_ref])
    trainer_logp, entropy, filtered_logp = (torch.cat([x[i] for x in lp]) for i in range(3)) if lp else (None,) * 3
    old_logp = trainer_logp if p.old_logp_source == "trainer" else batch["rollout_logp"]
    values = torch.cat(fetch(v_refs))
    t2 = time.perf_counter()

    # 3. rewards and advantages (driver side, pure math)
    if not bool(torch.isfinite(raw_scores).all()):
        raise FloatingPointError(f"non-finite reward scores at step {step + 1}: {raw_scores.tolist()[:8]}")
    scores = raw_scores.clamp(-cfg.reward.clip, cfg.reward.clip)
    scores = scores - cfg.reward.missing_eos_penalty * (~finished).float()
    if cfg.reward.normalize and B > 1:
        scores = (scores - scores.mean()) / (scores.std() + 1e-8)
    rewards, kl = token_rewards(scores, old_logp, ref_logp, mask, state.kl_coef, p.kl_kind)
    adv, _ = gae(rewards, values, mask, p.gamma, p.lam_actor)
    _, returns = gae(rewards, values, mask, p.gamma, p.lam_critic)
    metrics = batch_metrics(mask=mask, scores=raw_scores, finished=finished, old_logp=old_logp, ref_logp=ref_logp,
                            values=values, returns=returns, advantages=adv, config=cfg.metrics)
    if rescore:  # compare the rollout with the trainer under the same top-k / top-p (``filtered_logp``)
        again = batch_metrics(mask=mask, scores=raw_scores, finished=finished, old_logp=filtered_logp,
                              rollout_logp=batch["rollout_logp"])
        metrics.update({k: v for k, v in again.items() if k.startswith("kl/rollout_vs_trainer")})
    if cfg.reward.metrics is not None:  # gold metrics beside the reward (e.g. exact accuracy)
        metrics.update(ray.get(w.reward.gold_metrics.remote([g.prompt_ids for g in gens],
                                                            [g.response_ids for g in gens], finished.tolist())))
    if step == 0 and metrics["kl/rollout_vs_trainer"] > cfg.trainer.rollout_check_tol:
        raise RunStopped(
            f"kl/rollout_vs_trainer = {metrics['kl/rollout_vs_trainer']:.3g} at step 0 exceeds "
            f"trainer.rollout_check_tol = {cfg.trainer.rollout_check_tol}: the rollout engine and the trainer "
            "disagree on the same weights (check temperature/top-p handling, dtype, weight loading)")
    batch.update(old_logp=old_logp, old_values=values, returns=returns,
                 advantages=masked_whiten(adv, mask) if p.whiten_advantages else adv)
    if p.tis_cap is not None:
        batch["is_weights"] = truncated_is_weights(old_logp, batch["rollout_logp"], mask, p.tis_cap)

    # 4. PPO updates: actor (after the critic warm-up) and critic, all ranks in parallel
    bref = ray.put(batch)
    train_actor = step >= p.critic_warmup_steps
    a_plans, c_plans = make_plans(cfg, step, mask, len(w.actor)), make_plans(cfg, step, mask, len(w.critic))
    a_refs = [a.train.remote(bref, pl) for a, pl in zip(w.actor, a_plans)] if train_actor else []
    c_refs = [c.train.remote(bref, pl) for c, pl in zip(w.critic, c_plans)]
    stats = fetch(a_refs + c_refs)
    a_stats = [s for rank in stats[:len(a_refs)] for s in rank]
    c_stats = [s for rank in stats[len(a_refs):] for s in rank]
    t3 = time.perf_counter()

    # 5. push the new actor weights to the rollout engine
    if train_actor:
        sync_weights(w)
    t4 = time.perf_counter()

    # 6. KL controller, metrics
    if p.kl_target is not None:
        state.kl_coef = adaptive_kl_coef(state.kl_coef, metrics["kl/to_reference_k1"], p.kl_target, p.kl_horizon, B)
    metrics.update(reduce_update_stats(a_stats, ACTOR_STAT_NAMES))
    metrics.update(reduce_update_stats(c_stats, CRITIC_STAT_NAMES))
    metrics.update({
        "kl/coef": state.kl_coef,
        "reward/shaped_mean": float(rewards.sum(1).mean()), "timing/generate": t1 - t0, "timing/score": t2 - t1,
        "timing/train": t3 - t2, "timing/sync": t4 - t3, "timing/step": t4 - t0,
        "perf/tokens_per_s": float(batch["attention_mask"].sum()) / max(t4 - t0, 1e-9),
    })
    if entropy is not None:
        metrics["rollout/entropy"] = float((entropy * mask).sum() / mask.sum())
    state.step += 1
    return metrics


def sync_weights(w) -> None:
    """Actor -> rollout engine. Broadcast (``w.weight_specs`` set, engines placed apart): every actor
    rank gathers each parameter in turn and rank 0 broadcasts it to every vLLM worker. Reload
    (colocated): rank 0 returns the full weights, which reach the engine through Ray's object store
    (the ref goes straight to the rollout worker; the driver never holds the weights)."""
    if w.weight_specs is not None:
        fetch([a.broadcast_weights.remote() for a in w.actor] + [w.rollout.receive_weights.remote(w.weight_specs)])
        return
    refs = [a.weights.remote() for a in w.actor]  # every rank joins the ZeRO-3 gather; rank 0 returns them
    fetch(refs[1:] + [w.rollout.update_weights.remote(refs[0])])  # the rollout worker resolves the ref itself


def probe_step(cfg: PPOConfig, w, probe_ids: list[list[int]], run_dir: Path, step: int, tok) -> dict[str, float]:
    """Re-sample the fixed probe prompts (fixed seed); log per-prompt lengths and rewards."""
    import ray

    from rlhf.engines.base import SamplingParams
    from rlhf.workers.batch import collate

    r = cfg.rollout
    params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                            top_k=r.top_k, seed=cfg.seed + 7)
    gens = ray.get(w.rollout.generate.remote(probe_ids, params))
    batch = collate(gens, tok.pad_token_id)
    scores = ray.get(w.reward.score.remote(batch, probe_ids, [g.response_ids for g in gens],
                                           [g.finished for g in gens])).tolist()
    lengths = [len(g.response_ids) for g in gens]
    with open(run_dir / "probes.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "lengths": lengths, "scores": scores,
                            "responses": tok.batch_decode([g.response_ids for g in gens])}) + "\n")
    return {"probe/length_mean": float(np.mean(lengths)), "probe/reward_mean": float(np.mean(scores))}


def save_checkpoint(cfg: PPOConfig, w, state: LoopState, run_dir: Path, tok) -> Path:
    """``checkpoints/step_XXXXXX``: actor (HF format, loadable directly), critic, engine states,
    RNG, data position, KL coefficient, detector state. Written to a temporary sibling, then renamed."""
    import ray

    root = run_dir / "checkpoints"
    final = root / f"step_{state.step:06d}"
    tmp = root / f".tmp_step_{state.step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fetch([a.save_pretrained.remote(str(tmp / "actor")) for a in w.actor]
            + [c.save_pretrained.remote(str(tmp / "critic")) for c in w.critic]
            + [a.save_state.remote(str(tmp / "actor_state")) for a in w.actor]
            + [c.save_state.remote(str(tmp / "critic_state")) for c in w.critic])
    tok.save_pretrained(str(tmp / "actor"))
    torch.save({"step": state.step, "sampler": state.sampler.state_dict(), "kl_coef": state.kl_coef,
                "monitor": state.monitor.state_dict(), "rng": rng_state()}, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (root / "latest.tmp").write_text(final.name)
    (root / "latest.tmp").rename(root / "latest")
    for old in sorted(root.glob("step_*"))[:-max(cfg.trainer.keep_checkpoints, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    f = run_dir / "checkpoints" / "latest"
    return run_dir / "checkpoints" / f.read_text().strip() if f.exists() else None


def restore(w, state: LoopState, ckpt: Path) -> None:
    """Load engine states into the workers and the loop state from a checkpoint."""
    import ray

    fetch([a.load_state.remote(str(ckpt / "actor_state")) for a in w.actor]
            + [c.load_state.remote(str(ckpt / "critic_state")) for c in w.critic])
    s = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    state.step, state.kl_coef = s["step"], s["kl_coef"]
    state.sampler.load_state_dict(s["sampler"])
    state.monitor.load_state_dict(s["monitor"])
    set_rng_state(s["rng"])


# ----------------------------------------------------------------------------- the run

def train(cfg: PPOConfig, resume: bool = False) -> Path:
    """Run (or resume) PPO; returns the run directory."""
    import ray
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from rlhf.metrics import MetricLogger, StabilityMonitor
    from rlhf.workers import group

    run_dir = Path(cfg.run_dir)
    if not resume and latest_checkpoint(run_dir) is not None:
        raise ConfigError(f"run_dir: {run_dir} already holds checkpoints; use --resume {run_dir} or a new run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    paths = resolve_models(cfg, run_dir)
    check_inputs(cfg, paths)
    save_config(cfg, run_dir / "config.yaml")
    tok = AutoTokenizer.from_pretrained(paths.tokenizer)
    raw = load_prompts(cfg.data.path, cfg.data.prompt_key, cfg.data.num_builtin)
    prompt_ids = encode_prompts(raw, tok, cfg.data.chat_template, cfg.data.think_prefill, cfg.data.max_prompt_tokens)
    probe_ids = prompt_ids[:cfg.trainer.num_probes]

    if not ray.is_initialized():
        ray.init(address=cfg.cluster.address, include_dashboard=False, log_to_driver=False)
    state = LoopState(step=0, sampler=PromptSampler(len(prompt_ids), cfg.seed), kl_coef=cfg.ppo.kl_coef,
                      monitor=StabilityMonitor(cfg.metrics))
    restarts, w, logger = 0, None, None
    try:
        while True:
            try:
                w = group.spawn(cfg, paths, tok.pad_token_id, tok.eos_token_id)
                ckpt = latest_checkpoint(run_dir)
                if ckpt is not None:
                    restore(w, state, ckpt)
                    sync_weights(w)
                logger = MetricLogger(run_dir, resume_step=state.step if ckpt is not None else None,
                                      monitor=state.monitor)
                bar = tqdm(total=cfg.trainer.total_steps, initial=state.step, desc="ppo", unit="step")
                while state.step < cfg.trainer.total_steps:
                    metrics = ppo_step(cfg, w, state, prompt_ids, tok.pad_token_id)
                    if cfg.trainer.probe_every and state.step % cfg.trainer.probe_every == 0:
                        metrics.update(probe_step(cfg, w, probe_ids, run_dir, state.step, tok))
                    metrics = logger.log(state.step, metrics)  # the monitor adds stability/*
                    bar.update(1)
                    bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", len=f"{metrics['rollout/length_mean']:.1f}")
                    k = cfg.trainer.save_every
                    if (k and state.step % k == 0) or state.step == cfg.trainer.total_steps:
                        save_checkpoint(cfg, w, state, run_dir, tok)
                bar.close()
                return run_dir
            except FloatingPointError as e:
                ckpt = latest_checkpoint(run_dir)
                raise RunStopped(f"stopping: {e}; the last checkpoint ({ckpt or 'none yet'}) is kept") from None
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.ActorDiedError) as e:
                restarts += 1
                if restarts > cfg.trainer.max_restarts:
                    raise RunStopped(f"a Ray worker died {restarts} times; giving up "
                                       f"(trainer.max_restarts = {cfg.trainer.max_restarts})") from e
                print(f"[rlhf train] a worker died ({type(e).__name__}); restart {restarts}/"
                      f"{cfg.trainer.max_restarts} from the last checkpoint", file=sys.stderr)
                if logger is not None:
                    logger.close()
                    logger = None
                group.shutdown(w, graceful=False)  # survivors may sit in a collective with the dead rank
                w = None
                state = LoopState(step=0, sampler=PromptSampler(len(prompt_ids), cfg.seed), kl_coef=cfg.ppo.kl_coef,
                                  monitor=StabilityMonitor(cfg.metrics))
                seed_everything(cfg.seed)
    finally:
        if logger is not None:
            logger.close()
        group.shutdown(w)


def cli_main(argv: list[str] | None = None) -> int:
    """`rlhf train [CONFIG.yaml] [key.sub=value ...] [--resume RUN_DIR]`."""
    ap = argparse.ArgumentParser(prog="rlhf train", description="Run PPO from a YAML config.")
    ap.add_argument("args", nargs="*", help="CONFIG.yaml (default: configs/ppo/tiny_cpu.yaml) then key.sub=value overrides")
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    ns = ap.parse_args(argv)
    args = list(ns.args)
    config = args.pop(0) if args and "=" not in args[0] else None
    try:
        if ns.resume:
            if config is not None:
                raise ConfigError("--resume: give either a CONFIG or --resume RUN_DIR (the run's config.yaml is used)")
            cfg_path = Path(ns.resume) / "config.yaml"
            if not cfg_path.exists():
                raise ConfigError(f"--resume: {cfg_path} does not exist")
            cfg = load_config(cfg_path, args + [f"run_dir={ns.resume}"])
        else:
            cfg = load_config(config, args)
        run_dir = train(cfg, resume=bool(ns.resume))
    except ConfigError as e:
        print(f"rlhf train: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"rlhf train: {e}", file=sys.stderr)
        return 1
    print(f"run directory: {run_dir}\nTensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    return 0
