"""`rlhf sweep SWEEP.yaml`: a BAI ratio sweep (and other config axes), end to end.

1. **Merge, one pass.** The ``merge`` section is a ``bai merge`` recipe with ``alphas``; every
   input tensor is read once and every ratio's checkpoint written from it
   (``bai.merge(recipe, OUT/models)`` -> ``OUT/models/alpha_<a>``). Skipped when already there
   (a merge is renamed into place only when complete).
2. **One PPO run per point.** Points are the alphas times the cartesian product of ``axes``
   (dotted PPO config keys -> list of values). Each point's config is the base ``ppo_config``
   plus ``overrides``, its axis values, ``model.actor = OUT/models/alpha_<a>`` and
   ``run_dir = OUT/runs/<point>``. ``launcher: local`` runs them one after another in this
   process (on a cluster too: pass ``cluster.address=HEAD:6379`` as an override, as
   ``cluster/slurm/ray_8x8.sbatch sweep`` does); ``launcher: ray_jobs`` submits each point as a
   Ray job (``ray job submit`` semantics, via the dashboard at ``ray_address``) and waits.
3. **Resume.** A finished point has ``OUT/runs/<point>/SWEEP_DONE``; it is skipped. An
   unfinished one resumes from its last checkpoint (``rlhf train --resume`` semantics).
4. **Compare.** ``OUT/summary.md`` (a Table 2-style table: one column per point, one row per
   outcome: final reward, minimum length, collapse / hockey-stick verdicts, KL) and
   ``OUT/report/`` (``rlhf report`` over all runs: the figure grid overlaying every ratio).

All inputs (sweep keys, merge recipe, every point's PPO config) are validated before any work.
The paper's convention holds: ``alpha`` is the weight of the pretrained base model.
"""

from __future__ import annotations

from bairlhf.errors import UserError

import argparse
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DONE = "SWEEP_DONE"
SWEEP_KEYS = {"out", "ppo_config", "overrides", "merge", "axes", "launcher", "ray_address", "max_concurrent"}


class SweepError(UserError):
    """Bad sweep input; the message names the key."""


@dataclass
class Point:
    """One PPO run of the sweep."""

    name: str
    """Directory name under OUT/runs (``alpha_0.3`` or ``alpha_0.3__ppo.kl_coef=0.01``)."""
    alpha: float
    """BAI base-model weight of the actor init."""
    overrides: list[str]
    """Dotted overrides applied on top of the base PPO config for this point."""


@dataclass
class Sweep:
    """A validated sweep."""

    out: Path
    """Sweep directory: models/, runs/, summary.md, report/."""
    ppo_config: Path
    """Base PPO config (``rlhf train`` YAML)."""
    merge: dict
    """The ``bai merge`` recipe (method bai, ``alphas``)."""
    points: list[Point]
    """Every run, in order."""
    launcher: str = "local"
    """``local`` (sequential, this process) or ``ray_jobs``."""
    ray_address: str | None = None
    """Dashboard address for ``ray_jobs`` (e.g. ``http://head:8265``)."""
    max_concurrent: int = 1
    """Ray jobs in flight at once (8x8 runs take the whole cluster: keep 1)."""
    overrides: list[str] = field(default_factory=list)
    """Applied to every point (the YAML's, then the command line's)."""
    cli_overrides: list[str] = field(default_factory=list)
    """The command line's part of ``overrides`` (passed on to Ray jobs)."""

    def run_dir(self, p: Point) -> Path:
        return self.out / "runs" / p.name

    def model_dir(self, alpha: float) -> Path:
        from bai.config import alpha_dirname

        return self.out / "models" / alpha_dirname(alpha)


def _fmt_value(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def load_sweep(path: str | Path, extra_overrides: list[str] | None = None) -> Sweep:
    """Read and validate a sweep YAML; relative paths are relative to the current directory."""
    from bai.config import MergeError
    from bai.config import load_config as load_merge
    from rlhf.config import ConfigError, load_config

    path = Path(path)
    if not path.exists():
        raise SweepError(f"sweep: file does not exist: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise SweepError(f"sweep: {path} must hold a mapping")
    for k in data:
        if k not in SWEEP_KEYS:
            raise SweepError(f"{k}: unknown key (known: {', '.join(sorted(SWEEP_KEYS))})")
    for k in ("out", "ppo_config", "merge"):
        if k not in data:
            raise SweepError(f"{k}: missing")
    merge = data["merge"]
    if not isinstance(merge, dict) or merge.get("method") != "bai" or not isinstance(merge.get("alphas"), list):
        raise SweepError("merge: must be a bai recipe with a list of alphas (method: bai, alphas: [...])")
    try:
        mcfg = load_merge(dict(merge))
    except MergeError as e:
        raise SweepError(f"merge.{e}") from None
    overrides = list(data.get("overrides") or []) + list(extra_overrides or [])
    axes = data.get("axes") or {}
    if not isinstance(axes, dict) or any(not isinstance(v, list) or not v for v in axes.values()):
        raise SweepError("axes: expected a mapping of dotted config key -> non-empty list of values")
    launcher = data.get("launcher", "local")
    if launcher not in ("local", "ray_jobs"):
        raise SweepError(f"launcher: local or ray_jobs, got {launcher!r}")
    if launcher == "ray_jobs" and not data.get("ray_address"):
        raise SweepError("ray_address: required with launcher: ray_jobs (e.g. http://HEAD:8265)")
    sweep = Sweep(out=Path(data["out"]), ppo_config=Path(data["ppo_config"]), merge=dict(merge), points=[],
                  launcher=launcher, ray_address=data.get("ray_address"),
                  max_concurrent=int(data.get("max_concurrent", 1)), overrides=overrides,
                  cli_overrides=list(extra_overrides or []))
    if not sweep.ppo_config.exists():
        raise SweepError(f"ppo_config: file does not exist: {sweep.ppo_config}")
    keys = list(axes)
    for alpha in mcfg.alphas:
        for combo in itertools.product(*(axes[k] for k in keys)):
            axis_ov = [f"{k}={_fmt_value(v)}" for k, v in zip(keys, combo)]
            name = "__".join([f"alpha_{alpha:g}"] + [o.replace("/", "_") for o in axis_ov])
            sweep.points.append(Point(name=name, alpha=alpha, overrides=axis_ov))
    for p in sweep.points:  # every point's config must validate now, before any merge or run
        try:
            load_config(sweep.ppo_config, point_overrides(sweep, p), check_paths=False)
        except ConfigError as e:
            raise SweepError(f"point {p.name}: {e}") from None
    return sweep


def point_overrides(sweep: Sweep, p: Point) -> list[str]:
    """Everything a point changes in the base PPO config (later wins)."""
    return [*sweep.overrides, *p.overrides, f"model.actor={sweep.model_dir(p.alpha)}", "model.bai_recipe=null",
            f"run_dir={sweep.run_dir(p)}"]


def ensure_merged(sweep: Sweep) -> list[Path]:
    """All ratios in one pass (skipped when OUT/models is complete)."""
    import bai

    dirs = [sweep.model_dir(a) for a in sorted({p.alpha for p in sweep.points})]
    if all((d / "config.json").exists() for d in dirs):
        return dirs
    models = sweep.out / "models"
    if models.exists():
        raise SweepError(f"out: {models} exists but lacks {[d.name for d in dirs if not d.exists()]}; "
                         "remove it (or fix merge.alphas)")
    return bai.merge(sweep.merge, models)


def run_point_local(sweep: Sweep, p: Point) -> None:
    """One PPO run in this process (resumes from its last checkpoint); marks it done."""
    from rlhf.config import load_config
    from rlhf.trainer import train

    cfg = load_config(sweep.ppo_config, point_overrides(sweep, p))
    train(cfg, resume=True)
    (sweep.run_dir(p) / DONE).write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))


def _run_ray_jobs(sweep: Sweep, todo: list[Point], sweep_path: Path, progress) -> None:
    """Submit each point as a Ray job running ``rlhf sweep SWEEP.yaml --point NAME``; wait for all."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(sweep.ray_address)
    pending, running = list(todo), {}
    while pending or running:
        while pending and len(running) < sweep.max_concurrent:
            p = pending.pop(0)
            extra = " ".join(sweep.cli_overrides)
            job = client.submit_job(entrypoint=f"rlhf sweep {sweep_path} --point {p.name} {extra}".strip(),
                                    submission_id=f"rlhf-sweep-{p.name}-{int(time.time())}".replace(".", "_"))
            running[job] = p
        for job, p in list(running.items()):
            status = client.get_job_status(job)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                del running[job]
                progress.update(1)
                if status != JobStatus.SUCCEEDED:
                    raise RuntimeError(f"sweep point {p.name}: Ray job {job} {status}; rerun the sweep to resume")
        time.sleep(10)


def run_sweep(sweep: Sweep, sweep_path: Path | None = None, max_runs: int | None = None) -> list[str]:
    """Merge, run every unfinished point (at most ``max_runs`` this call), summarise.

    Returns the names of the points run by this call.
    """
    from tqdm import tqdm

    ensure_merged(sweep)
    todo = [p for p in sweep.points if not (sweep.run_dir(p) / DONE).exists()]
    if max_runs is not None:
        todo = todo[:max_runs]
    bar = tqdm(total=len(sweep.points), initial=len(sweep.points) - len(todo) if max_runs is None else
               sum((sweep.run_dir(p) / DONE).exists() for p in sweep.points), desc="sweep", unit="run")
    if sweep.launcher == "ray_jobs" and todo:
        _run_ray_jobs(sweep, todo, sweep_path or Path("sweep.yaml"), bar)
    else:
        for p in todo:
            bar.set_postfix(point=p.name)
            run_point_local(sweep, p)
            bar.update(1)
    bar.close()
    if all((sweep.run_dir(p) / DONE).exists() for p in sweep.points):
        summarize(sweep)
    return [p.name for p in todo]


# ------------------------------------------------------------------------------ comparison

def _last(records: list[dict], key: str):
    vals = [r[key] for r in records if r.get(key) is not None and math.isfinite(float(r[key]))]
    return float(vals[-1]) if vals else None


def _mean(records: list[dict], key: str):
    vals = [float(r[key]) for r in records if r.get(key) is not None and math.isfinite(float(r[key]))]
    return sum(vals) / len(vals) if vals else None


def summary_table(sweep: Sweep) -> str:
    """Table 2 layout: one column per point, one row per outcome."""
    from rlhf.report import load_run

    runs = [load_run(sweep.run_dir(p)) for p in sweep.points]
    heads = [f"α={p.alpha:g}, β={1 - p.alpha:g}" + ("".join(f"<br>{o}" for o in p.overrides)) for p in sweep.points]
    rows = [
        ("final reward", lambda r: _last(r.records, "reward/mean")),
        ("mean reward (all steps)", lambda r: _mean(r.records, "reward/mean")),
        ("final length", lambda r: _last(r.records, "rollout/length_mean")),
        ("min length", lambda r: min((float(x["rollout/length_mean"]) for x in r.records
                                      if x.get("rollout/length_mean") is not None), default=None)),
        ("length collapse", lambda r: r.verdicts["length_collapse"].verdict),
        ("hockey stick", lambda r: r.verdicts["hockey_stick"].verdict),
        ("final kl/policy_vs_sampling", lambda r: _last(r.records, "kl/policy_vs_sampling")),
        ("max kl/rollout_vs_trainer", lambda r: max((float(x["kl/rollout_vs_trainer"]) for x in r.records
                                                     if x.get("kl/rollout_vs_trainer") is not None), default=None)),
        ("steps", lambda r: int(r.records[-1]["step"]) if r.records else None),
    ]

    def cell(v):
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["# BAI ratio sweep", "",
             "alpha is the weight of the pretrained base model (BAI eq. 2); beta = 1 - alpha.", "",
             "| | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(cell(fn(r)) for r in runs) + " |")
    lines += ["", "Runs: " + ", ".join(f"`{sweep.run_dir(p)}`" for p in sweep.points),
              "", "Figures (all runs overlaid): `report/` (reward_buckets.png, reward.png, length.png, kl.png)"]
    return "\n".join(lines) + "\n"


def summarize(sweep: Sweep) -> Path:
    """Write OUT/summary.md (atomically) and OUT/report/ (``rlhf report`` over every run)."""
    from rlhf.report import write_report

    text = summary_table(sweep)
    tmp = sweep.out / f".summary.md.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, sweep.out / "summary.md")
    write_report([sweep.run_dir(p) for p in sweep.points], sweep.out / "report", force=True)
    return sweep.out / "summary.md"


def main(argv: list[str] | None = None) -> int:
    """`rlhf sweep SWEEP.yaml [key.sub=value ...] [--point NAME] [--max-runs N] [--dry-run]`."""
    ap = argparse.ArgumentParser(prog="rlhf sweep", description=__doc__.split("\n")[0])
    ap.add_argument("sweep", help="sweep YAML (see configs/sweep/)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value applied to every run (e.g. cluster.address=HEAD:6379)")
    ap.add_argument("--point", help="run only this point (what a Ray job of the sweep runs)")
    ap.add_argument("--max-runs", type=int, help="run at most N unfinished points now (the rest on the next call)")
    ap.add_argument("--dry-run", action="store_true", help="print the points and their overrides; run nothing")
    ns = ap.parse_args(argv)
    try:
        sweep = load_sweep(ns.sweep, ns.overrides)
        if ns.dry_run:
            print(f"sweep: {len(sweep.points)} runs -> {sweep.out}; merge alphas {sweep.merge['alphas']} "
                  f"into {sweep.out / 'models'} (one pass); launcher {sweep.launcher}")
            for p in sweep.points:
                state = "done" if (sweep.run_dir(p) / DONE).exists() else "todo"
                print(f"  [{state}] {p.name}: rlhf train {sweep.ppo_config} {' '.join(point_overrides(sweep, p))}")
            return 0
        if ns.point:
            match = [p for p in sweep.points if p.name == ns.point]
            if not match:
                raise SweepError(f"--point: no point named {ns.point!r}")
            ensure_merged(sweep)
            run_point_local(sweep, match[0])
            return 0
        ran = run_sweep(sweep, Path(ns.sweep), max_runs=ns.max_runs)
    except SweepError as e:
        print(f"rlhf sweep: {e}", file=sys.stderr)
        return 2
    done = all((sweep.run_dir(p) / DONE).exists() for p in sweep.points)
    print(f"rlhf sweep: ran {len(ran)} run(s); " + (f"summary: {sweep.out / 'summary.md'}, figures: "
                                                   f"{sweep.out / 'report'}" if done else "unfinished points remain"))
    return 0
