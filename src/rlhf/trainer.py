"""The single-controller PPO loop: `rlhf train CONFIG.yaml [key.sub=value ...] [--resume RUN_DIR] [--force]`.

Read top to bottom: ``cli_main`` parses the command line; ``train`` first validates everything
without writing (config, prompts, reward imports, model weights, the checkpoint to resume, the
run directory's ownership, the cluster's resources), then creates the run directory (tiny models
built or BAI merge run, ``config.yaml``), starts the Ray workers, restores the last checkpoint
when resuming, and calls ``ppo_step`` once per step. A step samples prompts, generates (collated
into a ``RolloutBatch``, ``rlhf.workers.batch``; with ``ppo.async_rollout`` the next step's batch is
generated while this one trains, ``rlhf.workers.async_rollout``), scores (actor, reference, critic, reward),
computes token rewards and advantages on the driver (``ppo.advantage_estimator``: GAE with the
critic, or a critic-free one and then no critic is spawned; a ``ScoredBatch``), trains actor (and
critic) over mini-batches, pushes the new actor weights to the rollout engine, logs metrics and checkpoints
every K steps, and acts on the detectors' verdicts (``metrics.on_*``: checkpoint, stop, or
``roll_back`` to the last checkpoint before a warning with a changed KL coefficient, learning rate or
re-merged actor, ``rlhf.metrics.actions``). A Ray worker that dies restarts the workers from the last
checkpoint (bounded retries); a worker whose constructor fails and a non-finite loss stop the
run with its last checkpoint intact. Every appended run file is cut back to the checkpoint's
step on resume and restart, so a resumed run's files equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from bairlhf.errors import UserError
from bairlhf.outputs import atomic_write, check_output, mark_output, owner
from rlhf.config import ConfigError, PPOConfig, load_config, rollout_check_tol, save_config, to_dict
from rlhf.data import PromptSampler, encode_prompts, load_prompts
from rlhf.workers import async_rollout
from rlhf.workers.perf import step_mfu
from rlhf.workers.rollback import check_rollback, relog_rollbacks, roll_back

COMMAND = "rlhf train"
RESUMABLE_KEYS = ("run_dir", "trainer.total_steps", "trainer.save_every", "trainer.keep_checkpoints",
                  "trainer.probe_every", "trainer.max_restarts", "cluster.address", "trainer.loggers")
"""The keys ``--resume`` may change (length, checkpoint and probe cadence, restarts, where Ray runs);
any other change would make the resumed run differ from the one ``config.yaml`` records."""
NON_DETERMINISTIC_PREFIXES = ("timing/", "perf/")


class RunStopped(RuntimeError):
    """The run stopped on purpose (failed rollout check, non-finite values, too many restarts, a
    detector whose ``metrics.on_*`` switch is ``stop``)."""


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
    rollbacks: list[dict] = field(default_factory=list)
    """The run's rollbacks so far (their ``stability_events.jsonl`` records, ``rlhf.metrics.actions``)."""
    pending: object = None
    """``ppo.async_rollout``: the next step's batch, in flight or loaded (``rlhf.workers.async_rollout``)."""


def model_paths(cfg: PPOConfig, run_dir: Path):
    """Model directories of the run (the tiny actor and the BAI merge live in the run directory)."""
    from rlhf.workers.group import ModelPaths

    m = cfg.model
    actor = m.actor
    if m.bai_recipe is not None:
        actor = str(run_dir / "models" / "bai_actor")
    elif actor == "tiny":
        actor = str(run_dir / "models" / "tiny_actor")
    critic = m.critic or cfg.reward.model or actor
    return ModelPaths(actor=actor, reference=m.reference or actor, critic=critic, tokenizer=m.tokenizer or actor)


def build_models(cfg: PPOConfig, run_dir: Path, tok) -> None:
    """Build the tiny actor (with tokenizer ``tok``) or run the BAI merge, once per run directory."""
    m = cfg.model
    actor = Path(model_paths(cfg, run_dir).actor)
    if actor.exists() or (m.bai_recipe is None and m.actor != "tiny"):
        return
    if m.bai_recipe is not None:
        from bai.config import MergeError
        from bai.merge import merge

        try:
            merge(m.bai_recipe, str(actor))
        except MergeError as e:
            raise ConfigError(f"model.bai_recipe: {e}") from e
        shutil.copy(m.bai_recipe, run_dir / "bai_recipe.yaml")  # the run records its recipe
        return
    from rlhf import tiny

    t, tmp = m.tiny, actor.with_name(actor.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tiny.make_tiny_model(tmp, arch=t.arch, tokenizer=tok, seed=t.seed, hidden_size=t.hidden_size,
                         num_layers=t.num_layers, num_heads=t.num_heads)
    tmp.rename(actor)


def check_inputs(cfg: PPOConfig, run_dir: Path):
    """Refuse bad inputs before any work; returns the tokenizer (the tiny one built in memory)."""
    from rlhf.workers.preflight import check_model_dir, check_reward_functions, uses_critic

    check_reward_functions(cfg, run_dir)
    paths, m = model_paths(cfg, run_dir), cfg.model
    if m.bai_recipe is not None:
        from bai.config import MergeError, load_config as load_merge_config

        try:
            recipe = load_merge_config(m.bai_recipe)
        except MergeError as e:
            raise ConfigError(f"model.bai_recipe: {e}") from e
        if recipe.sweep:
            raise ConfigError(f"model.bai_recipe: {m.bai_recipe} is a sweep; PPO needs one merge "
                              "(`rlhf sweep` runs one PPO job per ratio)")
        if m.tokenizer is None and not Path(paths.tokenizer).exists():  # the merge copies its reference's
            paths = replace(paths, tokenizer=str(recipe.inputs()[0]))
    seen, to_build = set(), m.actor == "tiny" or m.bai_recipe is not None
    for key, p in [("model.actor", paths.actor), ("model.reference", paths.reference),
                   ("reward.model", cfg.reward.model), ("model.critic", paths.critic)]:
        if p is None or p in seen or (to_build and p == paths.actor and not Path(p).exists()) or (
                key == "model.critic" and not uses_critic(cfg)):
            continue  # the tiny / merged actor is built after validation
        seen.add(p)
        check_model_dir(key, p, m.allow_pickle)
    built = not Path(paths.tokenizer).exists() and m.tokenizer is None
    if built:
        from rlhf import tiny

        tok = tiny.train_tokenizer(template=m.tiny.template)
    else:
        tok = _tokenizer("model.tokenizer" if m.tokenizer else "model.actor", paths.tokenizer)
    if cfg.reward.model is not None:
        theirs = _tokenizer("reward.model", cfg.reward.model).get_vocab()
        if tok.get_vocab() != theirs:
            raise ConfigError(f"reward.model: tokenizer of {cfg.reward.model} differs from the actor's "
                              f"({len(theirs)} vs {len(tok.get_vocab())} tokens)")
    return tok


def _tokenizer(key: str, path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{key}: no usable tokenizer in {path} ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:160]})") from None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def resume_changes(old: PPOConfig, new: PPOConfig) -> dict[str, tuple]:
    """Dotted key -> (recorded value, new value) for every key the two configs disagree on."""
    a, b = _flat(to_dict(old)), _flat(to_dict(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_run_dir(cfg: PPOConfig, resume: bool, force: bool) -> tuple[bool, dict]:
    """Decide, before any write, whether this call resumes ``run_dir`` (it holds a ``config.yaml``
    and ``resume``) or starts a new run there; returns (resuming, key -> (old, new) changes).

    A new run needs a missing or empty directory, or ``force`` and a directory an earlier ``rlhf
    train`` created (its marker) that holds none of this run's inputs. A resume may change only
    ``RESUMABLE_KEYS``; any other difference is refused, listing the keys."""
    run_dir = Path(cfg.run_dir)
    if resume and (run_dir / "config.yaml").exists():
        old = load_config(run_dir / "config.yaml", check_paths=False)
        changes = resume_changes(old, cfg)
        bad = {k: v for k, v in changes.items() if k not in RESUMABLE_KEYS}
        if bad:
            listed = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in bad.items())
            raise ConfigError(f"--resume: {run_dir} was started with other values of {listed}; a resume may "
                              f"change only {', '.join(RESUMABLE_KEYS)} (start a new run_dir for the rest)")
        return True, changes
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        if not force:
            hint = ("continue it with --resume or replace it with --force" if owner(run_dir) == COMMAND
                    else f"it was not created by `{COMMAND}`; choose a new run_dir")
            raise ConfigError(f"run_dir: {run_dir} already exists; {hint}")
    m = cfg.model
    inputs = [m.reference, m.critic, m.tokenizer, m.bai_recipe, cfg.reward.model,
              None if cfg.data.path.startswith("builtin:") else cfg.data.path,
              None if m.actor == "tiny" or m.bai_recipe else m.actor]
    if not (run_dir.is_dir() and not any(run_dir.iterdir())):  # an empty directory holds nothing to lose
        try:  # is, contains or lies inside an input; an existing one must be an earlier `rlhf train` run
            check_output(run_dir, COMMAND, inputs, force=force)
        except UserError as e:
            raise ConfigError(f"run_dir: {e}") from None
    return False, {}


def open_run_dir(cfg: PPOConfig, resuming: bool, changes: dict, overrides, tok) -> None:
    """The first writes: (re)create the run directory with its marker, clear stale temporaries,
    build the models, write ``config.yaml`` and, on resume, append to ``resumes.jsonl``."""
    run_dir = Path(cfg.run_dir)
    created = not run_dir.exists()
    if not resuming and run_dir.exists() and any(run_dir.iterdir()):  # --force, checked by check_run_dir
        old = run_dir.with_name(f".{run_dir.name}.old-{time.time_ns()}")
        run_dir.rename(old)
        shutil.rmtree(old)
        created = True
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        mark_output(run_dir, COMMAND)
        for stale in [*run_dir.glob("checkpoints/.tmp_step_*"), *run_dir.glob("checkpoints/.old_step_*"),
                      *run_dir.glob("models/*.tmp")]:
            shutil.rmtree(stale, ignore_errors=True)
        build_models(cfg, run_dir, tok)
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)  # no half-built run directory stays behind
        raise
    save_config(cfg, run_dir / "config.yaml")
    if resuming:
        ckpt = latest_checkpoint(run_dir)
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "from": ckpt.name if ckpt else None,
               "overrides": list(overrides), "changed": {k: list(v) for k, v in changes.items()}}
        with open(run_dir / "resumes.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


# ----------------------------------------------------------------------------- checkpoints

def rng_state() -> dict:
    """The driver's Python, numpy and torch RNG states as plain JSON."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(mt), gauss], "numpy": [name, keys.tolist(), int(pos), int(has_gauss),
                                                            float(cached)], "torch": torch.get_rng_state().tolist()}


def set_rng_state(s: dict) -> None:
    version, mt, gauss = s["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- one PPO step

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

    from rlhf.algo import adaptive_kl_coef, get_estimator, mismatch_keep_mask, truncated_is_weights
    from rlhf.algo.driver import step_advantages
    from rlhf.metrics import ACTOR_STAT_NAMES, CRITIC_STAT_NAMES, batch_metrics, preflight_report, reduce_update_stats
    from rlhf.workers.batch import ScoredBatch, collate, make_plans, split

    p, r = cfg.ppo, cfg.rollout
    step = state.step
    t0 = time.perf_counter()
    # 1. sample prompts and generate (``ppo.async_rollout``: take the batch generated during the last
    #    step, then launch the next one, which runs while this step scores and trains)
    gens, stale, ahead = async_rollout.rollout(cfg, w, state, prompt_ids)
    batch = collate(gens, pad_id)
    mask, B = batch.mask, len(gens)
    finished = torch.tensor([g.finished for g in gens])
    t1 = time.perf_counter()

    # 2. score: trainer logprobs (the old policy; with old_logp_source rollout only at step 0, for the
    #    rollout-vs-trainer check), reference logprobs, values, reward
    bref = ray.put(batch)
    c_shards = split(B, len(w.critic)) if w.critic else []  # no critic: a critic-free estimator
    rescore = p.old_logp_source == "trainer" or step == 0
    sub = list(range(B)) if rescore else sorted(random.Random(cfg.seed * 7919 + step).sample(
        range(B), min(B, p.mismatch_sample_rows)))  # old logprobs from the rollout: a sampled subset
    lp_refs = [a.logprobs.remote(bref, [sub[i] for i in rows], r.top_k, r.top_p)
               for a, rows in zip(w.actor, split(len(sub), len(w.actor))) if rows] if sub else []
    v_refs = [c.values.remote(bref, rows) for c, rows in zip(w.critic, c_shards)]
    ref_ref = w.reference.logprobs.remote(bref)
    score_ref = w.reward.score.remote(bref, [g.prompt_ids for g in gens], [g.response_ids for g in gens],
                                      finished.tolist())
    *lp, ref_logp, raw_scores = fetch(lp_refs + [ref_ref, score_ref])
    trainer_logp, entropy, filtered_logp = (torch.cat([x[i] for x in lp]) for i in range(3)) if lp else (None,) * 3
    old_logp = trainer_logp if p.old_logp_source == "trainer" else batch.rollout_logp
    values = torch.cat(fetch(v_refs)) if v_refs else None
    t2 = time.perf_counter()

    # 3. rewards and advantages (driver side, pure math)
    if not bool(torch.isfinite(raw_scores).all()):
        raise FloatingPointError(f"non-finite reward scores at step {step + 1}: {raw_scores.tolist()[:8]}")
    scores = raw_scores.clamp(-cfg.reward.clip, cfg.reward.clip)
    scores = scores - cfg.reward.missing_eos_penalty * (~finished).float()
    if cfg.reward.normalize and B > 1:
        scores = (scores - scores.mean()) / (scores.std() + 1e-8)
    est = get_estimator(p.advantage_estimator)
    adv = step_advantages(est.name, scores, old_logp, ref_logp, values, mask, kl_coef=state.kl_coef, kl_kind=p.kl_kind,
                        gamma=p.gamma, lam_actor=p.lam_actor, lam_critic=p.lam_critic, whiten=p.whiten_advantages,
                        n_samples_per_prompt=p.n_samples_per_prompt, eps=p.grpo_eps)
    metrics = batch_metrics(mask=mask, scores=raw_scores, finished=finished, old_logp=old_logp, ref_logp=ref_logp,
                            values=values, returns=adv.returns, advantages=adv.advantages, config=cfg.metrics)
    metrics.update(preflight_report(mask.sum(1), raw_scores, cfg.metrics) if step == 0 else {})  # length bias, 1st batch
    if sub:  # compare the rollout with the trainer under the same top-k / top-p (``filtered_logp``)
        again = batch_metrics(mask=mask[sub], scores=raw_scores[sub], finished=finished[sub], old_logp=filtered_logp,
                              rollout_logp=batch.rollout_logp[sub])
        metrics.update({k: v for k, v in again.items() if k.startswith("kl/rollout_vs_trainer")})
    if cfg.reward.metrics is not None:  # gold metrics beside the reward (e.g. exact accuracy)
        metrics.update(ray.get(w.reward.gold_metrics.remote([g.prompt_ids for g in gens],
                                                            [g.response_ids for g in gens], finished.tolist())))
    if step == 0 and metrics["kl/rollout_vs_trainer"] > rollout_check_tol(cfg):
        raise RunStopped(
            f"kl/rollout_vs_trainer = {metrics['kl/rollout_vs_trainer']:.3g} at step 0 exceeds "
            f"trainer.rollout_check_tol = {rollout_check_tol(cfg):g}: the rollout engine and the trainer "
            "disagree on the same weights (check temperature/top-p handling, dtype, weight loading)")
    is_weights = None
    if p.tis_cap is not None:
        is_weights = truncated_is_weights(old_logp, batch.rollout_logp, mask, p.tis_cap)
    if p.mismatch_reject is not None:  # masked IS: no policy gradient from sequences the engines disagree on
        keep = mismatch_keep_mask(filtered_logp, batch.rollout_logp, mask, p.mismatch_reject)
        is_weights = keep * (mask.float() if is_weights is None else is_weights)
        metrics["kl/rollout_vs_trainer_rejected_frac"] = 1.0 - float(keep.amax(-1).mean())
    scored = ScoredBatch.of(batch, old_logp=old_logp, old_values=values, returns=adv.returns, is_weights=is_weights,
                            advantages=adv.train)

    # 4. PPO updates: actor (after the critic warm-up) and critic, all ranks in parallel
    bref = ray.put(scored)
    train_actor = step >= p.critic_warmup_steps
    a_plans = make_plans(cfg, step, mask, len(w.actor), est.loss_agg)
    c_plans = make_plans(cfg, step, mask, len(w.critic)) if w.critic else []
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
        "reward/shaped_mean": float(adv.rewards.sum(1).mean()), "timing/generate": t1 - t0, "timing/score": t2 - t1,
        "timing/train": t3 - t2, "timing/sync": t4 - t3, "timing/step": t4 - t0,
        "perf/tokens_per_s": float(batch.attention_mask.sum()) / max(t4 - t0, 1e-9),
    })
    if p.async_rollout:  # timing/generate is then the wait for the batch generated ahead
        metrics["rollout/staleness"] = float(stale)
    metrics.update(step_mfu(cfg, batch, bool(w.critic), train_actor, {"score": t2 - t1, "train": t3 - t2,
                            "step": t4 - t0, **({} if ahead else {"generate": t1 - t0})}))
    if entropy is not None:
        metrics["rollout/entropy"] = float((entropy * mask[sub]).sum() / mask[sub].sum())
    state.step += 1
    return metrics


def sync_weights(w) -> None:
    """Actor -> rollout engine: the rollout side's ``WeightSync`` picks and runs the transport."""
    w.weight_sync.sync(w.actor, w.rollout)


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
    """``checkpoints/step_XXXXXX``: actor (HF format, loadable directly), critic (if the run has one),
    engine states, and ``trainer_state.json`` (step, data position, KL coefficient, detector and RNG states, the
run's rollbacks; no pickle).
    Written to a temporary sibling, then renamed; ``latest`` is replaced atomically."""
    from rlhf.workers.preflight import TRAINER_STATE

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
    async_rollout.save_pending(state, tmp)  # the batch generated ahead, by weights this checkpoint lacks
    atomic_write(tmp / TRAINER_STATE, json.dumps({
        "step": state.step, "sampler": state.sampler.state_dict(), "kl_coef": state.kl_coef,
        "monitor": state.monitor.state_dict(), "rng": rng_state(), "rollbacks": state.rollbacks}))
    old = root / f".old_{final.name}"  # a rollback writes its restored step again: swap, never leave a gap
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    atomic_write(root / "latest", final.name)
    for old in sorted(root.glob("step_*"))[:-max(cfg.trainer.keep_checkpoints, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    f = run_dir / "checkpoints" / "latest"  # written atomically after the step directory is complete
    return run_dir / "checkpoints" / f.read_text().strip() if f.exists() else None


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in ``run_dir/checkpoints`` (``step_XXXXXX``), ascending."""
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*") if p.name[5:].isdigit())


def restore(w, state: LoopState, ckpt: Path, cfg: PPOConfig) -> None:
    """Load engine states into the workers and the loop state from a checkpoint (checked by
    ``preflight.check_checkpoint`` before any worker started); with ``cfg.ppo.async_rollout`` an
    in-flight generation is dropped for the checkpoint's pending batch."""
    from rlhf.workers.preflight import read_trainer_state

    fetch([a.load_state.remote(str(ckpt / "actor_state")) for a in w.actor]
          + [c.load_state.remote(str(ckpt / "critic_state")) for c in w.critic])
    s = read_trainer_state(ckpt)
    state.step, state.kl_coef = int(s["step"]), float(s["kl_coef"])
    state.sampler.load_state_dict(s["sampler"])
    state.monitor.load_state_dict(s["monitor"])
    state.rollbacks = list(s.get("rollbacks", []))  # absent in checkpoints of older versions
    set_rng_state(s["rng"])
    state.pending = async_rollout.load_pending(cfg, ckpt)


# ----------------------------------------------------------------------------- the run

def fresh_state(cfg: PPOConfig, n_prompts: int) -> LoopState:
    from rlhf.metrics import StabilityMonitor

    seed_everything(cfg.seed)
    return LoopState(step=0, sampler=PromptSampler(n_prompts, cfg.seed), kl_coef=cfg.ppo.kl_coef,
                     monitor=StabilityMonitor(cfg.metrics))


def train(cfg: PPOConfig, resume: bool = False, force: bool = False, overrides=()) -> Path:
    """Run (or, with ``resume`` and a ``config.yaml`` in ``run_dir``, continue) PPO; returns the run
    directory. Nothing is written before every input has been checked."""
    from bairlhf.progress import progress as tqdm  # plain lines in non-TTY logs
    from transformers import AutoTokenizer

    from rlhf.metrics import MetricLogger
    from rlhf.metrics.actions import due_actions, pick_rollback, take_actions
    from rlhf.metrics.logger import truncate_jsonl
    from rlhf.placement import make_plan, spec_from_ppo_config
    from rlhf.workers import group
    from rlhf.workers.preflight import check_checkpoint, check_resources, uses_critic

    run_dir = Path(cfg.run_dir)
    # 1. validate, writing nothing
    check_rollback(cfg)
    resuming, changes = check_run_dir(cfg, resume, force)
    raw = load_prompts(cfg.data.path, cfg.data.prompt_key, cfg.data.num_builtin)
    tok = check_inputs(cfg, run_dir)
    ckpt = latest_checkpoint(run_dir) if resuming else None
    if ckpt is not None:
        check_checkpoint(ckpt, critic=uses_critic(cfg))
        async_rollout.load_pending(cfg, ckpt)  # present and readable
    group.init_ray(cfg.cluster.address)
    if cfg.cluster.address is None:  # a fixed local cluster: refuse a plan that cannot fit now, naming the resource
        check_resources(make_plan(spec_from_ppo_config(cfg)))
    # 2. the run directory
    open_run_dir(cfg, resuming, changes, overrides, tok)
    paths = model_paths(cfg, run_dir)
    tok = AutoTokenizer.from_pretrained(paths.tokenizer)
    prompt_ids = encode_prompts(raw, tok, cfg.data.chat_template, cfg.data.think_prefill, cfg.data.max_prompt_tokens)
    probe_ids = prompt_ids[:cfg.trainer.num_probes]
    # 3. the loop, restarted from the last checkpoint when a worker dies
    state, restarts, w, logger = fresh_state(cfg, len(prompt_ids)), 0, None, None
    try:
        while True:
            try:
                w = group.spawn(cfg, paths, tok.pad_token_id, tok.eos_token_id)
                ckpt = latest_checkpoint(run_dir)
                if ckpt is not None:
                    restore(w, state, ckpt, cfg)
                    sync_weights(w)
                truncate_jsonl(run_dir / "probes.jsonl", state.step)  # the logger cuts metrics and events
                logger = MetricLogger(run_dir, resume_step=state.step, monitor=state.monitor, loggers=cfg.trainer.loggers)
                relog_rollbacks(logger, state)
                bar = tqdm(total=cfg.trainer.total_steps, initial=state.step, desc="ppo", unit="step")
                while state.step < cfg.trainer.total_steps:
                    metrics = ppo_step(cfg, w, state, prompt_ids, tok.pad_token_id)
                    if cfg.trainer.probe_every and state.step % cfg.trainer.probe_every == 0:
                        metrics.update(probe_step(cfg, w, probe_ids, run_dir, state.step, tok))
                    metrics = logger.log(state.step, metrics)  # the monitor adds stability/*
                    bar.update(1)
                    bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", len=f"{metrics['rollout/length_mean']:.1f}")
                    acts = due_actions(state.monitor.new_events, cfg.metrics, state.rollbacks,  # metrics.on_*
                                       checkpoint_steps(run_dir))
                    roll = pick_rollback(acts)
                    if roll is not None:  # back to an earlier checkpoint: this step is abandoned, not saved
                        logger = roll_back(cfg, w, state, run_dir, tok, logger, roll)  # closes the old one
                        bar.update(state.step - bar.n)
                        continue
                    k = cfg.trainer.save_every
                    saved = bool(k and state.step % k == 0) or state.step == cfg.trainer.total_steps
                    if saved:
                        save_checkpoint(cfg, w, state, run_dir, tok)
                    stop = take_actions(logger, cfg.metrics, lambda: latest_checkpoint(run_dir) if saved
                                        else save_checkpoint(cfg, w, state, run_dir, tok), acts)
                    if stop:
                        raise RunStopped(stop)
                bar.close()
                return run_dir
            except FloatingPointError as e:
                ckpt = latest_checkpoint(run_dir)
                raise RunStopped(f"stopping: {e}; the last checkpoint ({ckpt or 'none yet'}) is kept") from None
            except group.WorkerStartError as e:
                ckpt = latest_checkpoint(run_dir)
                raise RunStopped(f"{e}; the last checkpoint ({ckpt or 'none yet'}) is kept") from None
            except group.WORKER_DEATHS as e:
                restarts += 1
                why = " ".join(str(e).split())[:300]
                if restarts > cfg.trainer.max_restarts:
                    raise RunStopped(f"a Ray worker died {restarts} times; giving up (trainer.max_restarts = "
                                     f"{cfg.trainer.max_restarts}); last: {why}") from e
                print(f"[{COMMAND}] a worker died ({type(e).__name__}: {why}); restart {restarts}/"
                      f"{cfg.trainer.max_restarts} from the last checkpoint", file=sys.stderr)
                if logger is not None:
                    logger.close()
                    logger = None
                group.shutdown(w, graceful=False)  # survivors may sit in a collective with the dead rank
                w = None
                state = fresh_state(cfg, len(prompt_ids))
    finally:
        if logger is not None:
            logger.close()
        group.shutdown(w)
