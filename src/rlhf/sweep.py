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

All inputs (sweep keys through a typed builder with ranges, merge recipe, every point's PPO
config) are validated before any work; bad input is one ``SweepError`` naming the key (and the
file and line for YAML syntax).
The paper's convention holds: ``alpha`` is the weight of the pretrained base model.

Output ownership (``bairlhf.outputs``): OUT carries the marker of ``rlhf sweep``. Rerunning the
same sweep resumes into its own OUT; an existing OUT that another command (or a person) made is
refused, and so is an OUT that is, contains or lies inside an input (the PPO config, the sweep
file, a merge input checkpoint). ``--force`` starts afresh: it replaces an earlier ``rlhf sweep``
output (only one with the marker) by an empty one.
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import yaml

from bairlhf.errors import UserError
from bairlhf.outputs import atomic_write, check_output, mark_output, owner, replace_dir
from bairlhf.typed_config import Range, build
from bairlhf.yamlio import load_mapping

DONE = "SWEEP_DONE"
COMMAND = "rlhf sweep"
"""The owner name in OUT's marker file."""


class SweepError(UserError):
    """Bad sweep input; the message names the key."""


Launcher = Literal["local", "ray_jobs"]
"""How points run: ``local`` (sequential, this process) or ``ray_jobs`` (one Ray job per point)."""


@dataclass
class SweepFile:
    """The keys of a sweep YAML (checked by ``bairlhf.typed_config.build``)."""

    out: str
    """Sweep directory (models/, runs/, summary.md, report/); required."""
    ppo_config: str
    """Base PPO config (``rlhf train`` YAML); required, must exist."""
    merge: dict
    """A ``bai merge`` recipe with ``method: bai`` and a list of ``alphas``; required."""
    overrides: list[str] = field(default_factory=list)
    """``key.sub=value`` overrides applied to every point."""
    axes: dict[str, list] = field(default_factory=dict)
    """Dotted PPO config key -> non-empty list of values; points are alphas x their product."""
    launcher: Launcher = "local"
    """``local`` (sequential, this process) or ``ray_jobs`` (one Ray job per point)."""
    ray_address: str | None = None
    """Dashboard address for ``ray_jobs`` (``http://HEAD:8265``); required with it."""
    max_concurrent: Annotated[int, Range(1, 1024)] = 1
    """Ray jobs in flight at once (1 .. 1024; 8x8 runs take the whole cluster: keep 1)."""


SWEEP_KEYS = {f for f in SweepFile.__dataclass_fields__}


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
    launcher: Launcher = "local"
    """``local`` (sequential, this process) or ``ray_jobs``."""
    ray_address: str | None = None
    """Dashboard address for ``ray_jobs`` (e.g. ``http://head:8265``)."""
    max_concurrent: int = 1
    """Ray jobs in flight at once (8x8 runs take the whole cluster: keep 1)."""
    overrides: list[str] = field(default_factory=list)
    """Applied to every point (the YAML's, then the command line's)."""
    cli_overrides: list[str] = field(default_factory=list)
    """The command line's part of ``overrides`` (passed on to Ray jobs)."""
    inputs: list[Path] = field(default_factory=list)
    """Files and directories the sweep reads (OUT may not be, contain or lie inside one)."""

    def run_dir(self, p: Point) -> Path:
        return self.out / "runs" / p.name

    def model_dir(self, alpha: float) -> Path:
        from bai.config import alpha_dirname

        return self.out / "models" / alpha_dirname(alpha)


def _fmt_value(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def _check_overrides(items: list, key: str) -> list[str]:
    for i, o in enumerate(items):
        if not isinstance(o, str) or "=" not in o or not o.split("=", 1)[0].strip():
            raise SweepError(f"{key}[{i}]: expected key.sub=value, got {o!r}")
    return list(items)


def load_sweep(path: str | Path, extra_overrides: list[str] | None = None) -> Sweep:
    """Read and validate a sweep YAML; relative paths are relative to the current directory."""
    from bai.config import load_config as load_merge
    from rlhf.config import load_config

    path = Path(path)
    data = load_mapping(path, "sweep")
    sf = build(SweepFile, data, "", SweepError, missing="{path}: missing (a sweep needs out, ppo_config and merge)")
    merge = sf.merge
    if merge.get("method") != "bai" or not isinstance(merge.get("alphas"), list):
        raise SweepError("merge: must be a bai recipe with a list of alphas (method: bai, alphas: [...])")
    try:
        mcfg = load_merge(dict(merge))
    except UserError as e:
        raise SweepError(f"merge.{e}") from None
    overrides = _check_overrides(sf.overrides, "overrides") + _check_overrides(list(extra_overrides or []),
                                                                               "command-line override")
    for k, v in sf.axes.items():
        if not k or not v:
            raise SweepError(f"axes.{k}: expected a dotted config key -> non-empty list of values, got {v!r}")
    if sf.launcher == "ray_jobs" and not sf.ray_address:
        raise SweepError("ray_address: required with launcher: ray_jobs (e.g. http://HEAD:8265)")
    if not str(sf.out).strip():
        raise SweepError("out: must be a directory path, got an empty string")
    sweep = Sweep(out=Path(sf.out), ppo_config=Path(sf.ppo_config), merge=dict(merge), points=[],
                  launcher=sf.launcher, ray_address=sf.ray_address, max_concurrent=sf.max_concurrent,
                  overrides=overrides, cli_overrides=list(extra_overrides or []))
    if not sweep.ppo_config.is_file():
        raise SweepError(f"ppo_config: file does not exist: {sweep.ppo_config}")
    sweep.inputs = [path, sweep.ppo_config, *mcfg.inputs()]
    keys = list(sf.axes)
    for alpha in mcfg.alphas:
        for combo in itertools.product(*(sf.axes[k] for k in keys)):
            axis_ov = [f"{k}={_fmt_value(v)}" for k, v in zip(keys, combo)]
            name = "__".join([f"alpha_{alpha:g}"] + [o.replace("/", "_") for o in axis_ov])
            sweep.points.append(Point(name=name, alpha=alpha, overrides=axis_ov))
    for p in sweep.points:  # every point's config must validate now, before any merge or run
        try:
            load_config(sweep.ppo_config, point_overrides(sweep, p), check_paths=False)
        except UserError as e:
            raise SweepError(f"point {p.name}: {e}") from None
    return sweep


def legacy_sweep_output(path: Path) -> bool:
    """An OUT of an ``rlhf sweep`` from before marker files: only models/, runs/, summary.md, report/."""
    kids = {k.name for k in path.iterdir()} if path.is_dir() else set()
    return bool(kids) and kids <= {"models", "runs", "summary.md", "report"} and "runs" in kids


def prepare_out(sweep: Sweep, force: bool = False, create: bool = True) -> bool:
    """Claim OUT before any work; returns True when resuming into an earlier output.

    A missing OUT is created (with the marker); an earlier output of this command is resumed
    into, or with ``force`` replaced by an empty one; anything else is refused, as is an OUT
    that is, contains or lies inside an input. ``create=False`` only checks (``--dry-run``)."""
    out = sweep.out
    try:   # inputs first, then ownership (force=True: an existing OUT must be ours either way)
        check_output(out, COMMAND, sweep.inputs, force=True, legacy=legacy_sweep_output)
    except UserError as e:
        raise SweepError(f"out: {e}") from None
    exists = out.exists()
    if exists and not force:
        if create and owner(out) is None:
            mark_output(out, COMMAND)      # a legacy output: mark it now
        return True
    if create:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-sweep-", dir=out.parent))
        mark_output(tmp, COMMAND)
        replace_dir(tmp, out)
    return False


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
    atomic_write(sweep.run_dir(p) / DONE, time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))


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


def run_sweep(sweep: Sweep, sweep_path: Path | None = None, max_runs: int | None = None,
              force: bool = False) -> list[str]:
    """Claim OUT (``prepare_out``: resume into an earlier output of this sweep, or start afresh
    with ``force``), merge, run every unfinished point (at most ``max_runs`` this call), summarise.

    Returns the names of the points run by this call.
    """
    from bairlhf.progress import progress as tqdm  # plain lines in non-TTY logs

    prepare_out(sweep, force=force)
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

    atomic_write(sweep.out / "summary.md", summary_table(sweep))
    write_report([sweep.run_dir(p) for p in sweep.points], sweep.out / "report", force=True)
    return sweep.out / "summary.md"
