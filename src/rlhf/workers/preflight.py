"""Checks the driver runs before it spawns any worker (or writes anything), so a bad input stops
with one ``ConfigError`` naming the key, file or tensor instead of a worker that dies in its
constructor and is retried as a crash.

- ``check_model_dir``: weights present (safetensors, or ``.bin`` with ``model.allow_pickle``), the
  index's shards all there, every safetensors header readable and every floating tensor finite.
- ``check_checkpoint``: a checkpoint directory of ``rlhf train``: its HF actor / critic (when the
  run has one, ``uses_critic``) as above,
  the JSON trainer state, and every DeepSpeed state file loaded without pickle code execution
  (``deepspeed_engine.safe_load``) with finite tensors (weights and optimizer moments).
- ``check_reward_functions``: ``reward.function`` / ``reward.metrics`` import here, from installed
  modules only unless ``reward.allow_local_code`` (``rlhf.rewards.import_installed``).
- ``check_resources``: the placement plan fits the Ray cluster; the error names what is short
  (CPUs on a CPU-only run, GPUs otherwise).

Reading every tensor once costs about one pass over the weights on disk (streamed one tensor at
a time); it is the price of a named error instead of NaNs in the first step's sampling.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.config import ConfigError


def uses_critic(cfg) -> bool:
    """Whether the run spawns, trains and checkpoints a critic (``ppo.advantage_estimator``'s
    ``needs_critic``)."""
    from rlhf.algo.estimators import get_estimator

    return get_estimator(cfg.ppo.advantage_estimator).needs_critic


def check_model_dir(key: str, path: str | Path, allow_pickle: bool = False) -> None:
    """Refuse a model directory whose weights are missing, unreadable or non-finite."""
    import torch
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{key}: {p} is not a model directory")
    shards = sorted(p.glob("*.safetensors"))
    index = p / "model.safetensors.index.json"
    if index.exists():
        try:
            wanted = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{key}: {index} is not a safetensors index ({type(e).__name__}: {e})") from None
        missing = sorted(w for w in wanted if not (p / str(w)).is_file())
        if missing:
            raise ConfigError(f"{key}: {index} lists shards that are missing: {missing[:4]}")
    if not shards:
        has_bin = any(p.glob("*.bin"))
        if has_bin and allow_pickle:
            return  # pickled weights, allowed on purpose; transformers checks them when loading
        why = "only pickled .bin weights (set model.allow_pickle: true)" if has_bin else "no model weights"
        raise ConfigError(f"{key}: {p} holds {why}")
    for f in shards:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    t = st.get_tensor(name)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        raise ConfigError(f"{key}: tensor {name} in {f} holds NaN or inf values")
        except SafetensorError as e:
            raise ConfigError(f"{key}: {f} is not a readable safetensors file ({e})") from None
        except OSError as e:
            raise ConfigError(f"{key}: cannot read {f} ({e})") from None


TRAINER_STATE = "trainer_state.json"
"""Loop state of a checkpoint (step, data position, KL coefficient, detector and RNG states), JSON."""


def read_trainer_state(ckpt: Path) -> dict:
    """The checkpoint's JSON loop state; ``ConfigError`` naming the file when it is absent or bad."""
    f = ckpt / TRAINER_STATE
    if not f.exists():
        old = " (trainer_state.pt is a pickle of an older version and is not loaded)" \
            if (ckpt / "trainer_state.pt").exists() else ""
        raise ConfigError(f"--resume: {f} does not exist{old}")
    try:
        s = json.loads(f.read_text())
        if not isinstance(s, dict) or not {"step", "sampler", "kl_coef", "monitor", "rng"} <= set(s):
            raise ValueError("missing keys")
    except ValueError as e:
        raise ConfigError(f"--resume: {f} is not a trainer state ({e})") from None
    return s


def check_checkpoint(ckpt: Path, critic: bool = True) -> dict:
    """Validate everything ``restore`` will load from ``ckpt`` (the critic only with ``critic``);
    returns the trainer state."""
    from safetensors.torch import load_file

    from rlhf.engines.deepspeed_engine import first_non_finite, safe_load

    if not ckpt.is_dir():
        raise ConfigError(f"--resume: {ckpt.parent / 'latest'} names {ckpt.name}, which does not exist")
    state = read_trainer_state(ckpt)
    for role in ("actor", "critic") if critic else ("actor",):
        check_model_dir(f"checkpoint {role}", ckpt / role)
        files = sorted((ckpt / f"{role}_state").rglob("*.pt"))  # DeepSpeed; megatron: safetensors + JSON
        files += sorted((ckpt / f"{role}_state").glob("megatron_*.safetensors"))
        if not files:
            raise ConfigError(f"--resume: {ckpt / f'{role}_state'} holds no engine state")
        for f in files:
            try:
                obj = load_file(f) if f.suffix == ".safetensors" else safe_load(f)
            except Exception as e:  # UnpicklingError for a disallowed global, RuntimeError for a bad zip
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise ConfigError(f"--resume: {f} cannot be loaded safely ({first})") from None
            bad = first_non_finite(obj)
            if bad is not None:
                raise ConfigError(f"--resume: {f} holds NaN or inf values in {bad}")
    return state


def check_reward_functions(cfg, run_dir: Path) -> None:
    """Import ``reward.function`` / ``reward.metrics`` in the driver (installed modules only)."""
    from rlhf.rewards import RewardImportError, load_reward_function

    r = cfg.reward
    for key, spec in (("reward.function", r.function if r.model is None else None), ("reward.metrics", r.metrics)):
        if spec is None:
            continue
        try:
            load_reward_function(spec, key, [run_dir], r.allow_local_code)
        except RewardImportError as e:
            raise ConfigError(str(e)) from None


def check_resources(plan) -> None:
    """The placement plan's bundles fit the Ray cluster now joined (``ray.cluster_resources``)."""
    import ray

    from rlhf.placement import PlacementError, bundle_resources

    have = ray.cluster_resources()
    need: dict[str, float] = {}
    for n in range(plan.nodes_used):
        for g in range(plan.spec.gpus_per_node):
            for k, v in bundle_resources(plan, n, g).items():
                need[k] = need.get(k, 0.0) + v
    for k in ("GPU", "CPU"):
        if need.get(k, 0.0) > have.get(k, 0.0) + 1e-9:
            run = "a GPU run" if plan.spec.gpu else "a CPU-only run"
            hint = ("cluster.cpus_per_worker" if k == "CPU" else "cluster.gpus_per_worker / cluster.actor_workers")
            raise PlacementError(f"cluster: the placement plan needs {need[k]:g} {k}s ({run}), the Ray cluster has "
                                 f"{have.get(k, 0.0):g}; lower {hint} or join a larger cluster (cluster.address)")
