"""``rlhf demo``: the README's main job on the CPU: the testbed organism's short version.

1. Builds (or reuses) a demo-sized testbed organism with the project's own trainers
   (``rlhf.testbed.build`` with ``DEMO_SPEC``: base, instruct, reasoning and mix SFT models of a
   tiny Llama on 1-3 digit addition, and a reward model trained on short answers only), cached
   under ``OUT/testbed``.
2. Runs the paper's two-stage BAI merge of the organism's models in one pass (instruct and
   reasoning merged 50/50, then with the base at alpha = weight of the base, 9 ratios) and
   evaluates every merged model (greedy: gold accuracy, think rate, length).
3. Runs PPO twice on one local Ray cluster (DeepSpeed on CPU, ``configs/testbed/rm_mix.yaml``:
   the reward model trained on short answers, critic initialized from it): from the mix SFT model
   (the organism's collapse case) and from the BAI merge at ``--alpha`` (merged by the trainer).
4. Draws the report figures with ``rlhf report`` (length collapse detected and marked) plus
   ``organism.png`` (length, reward-model score, gold accuracy, think rate), and prints the
   detector verdict of each run, the figure paths and the TensorBoard command.

Nothing is downloaded. ``OUT/models/{base,instruct_sft,reasoning_sft}`` link to the organism's
base, instruct and reasoning models (the inputs of the ``configs/merge/`` examples).

``--out`` is the demo's own directory: used when absent or empty, or reused (its cached organism
and earlier results replaced) when an earlier ``rlhf demo`` wrote it (its marker file, or an
unmarked directory with nothing but the demo's layout, from before marker files). Any other
directory, one that is or contains the demo's input config, and a non-link in ``OUT/models`` are
refused before anything is written: the demo only replaces what it created.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from bairlhf.errors import UserError
from bairlhf.outputs import MARKER, atomic_write, owner

ALPHAS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
REPO = Path(__file__).resolve().parents[2]
PPO_CONFIG = REPO / "configs" / "testbed" / "rm_mix.yaml"
COMMAND = "rlhf demo"
"""The command named in the marker file of a demo directory."""
LINKS = {"base": "base", "instruct_sft": "instruct", "reasoning_sft": "reasoning"}
"""``OUT/models/NAME`` -> the organism's ``testbed/models/TARGET``."""
LAYOUT = frozenset({"testbed", "models", "bai_sweep", "ppo", "report", MARKER})
"""The top-level entries of a demo directory (plus ``bai_alpha_*.yaml`` recipes)."""
LEGACY_REPORT = frozenset({"organism.png", "length.png", "reward.png", "reward_buckets.png", "kl.png", "summary.md"})
"""What ``OUT/report`` held before report directories carried a marker."""


class DemoError(UserError):
    """Bad input to ``rlhf demo`` (a flag value or its output directory)."""

DEMO_SPEC = dict(max_digits=3, base_examples=24_000, sft_examples=3_200, sft_lr=1e-3, rm_pairs=1_024,
                 mix_empty_fraction=0.2, eval_problems=32, ppo_prompts=1_024, sweep=[0.5])
"""The demo-sized organism: overrides of ``rlhf.testbed.build.BuildSpec`` (its data recipe, e.g. the
worked-example base pretraining and the reward model's own short-answer SFT, is the default one):
the default model (hidden 128, 4 layers), 1-3 digit numbers (traces of 16-45 tokens), 24k base and
3.2k SFT examples, a mix model with 20% empty traces (a stronger short mode, so the collapse comes
well within 60 steps). Two to four minutes of training on 2 shared cores. Measured with the build
of commit 5f671ea: base / reasoning / mix greedy accuracy 0.72 / 0.97 / 0.94, the reward model
scores correct long answers 1.17 std below correct short ones, and PPO from the mix model collapses
at step 9 (gold accuracy 0.70 -> 0.00 while the reward-model score rises; at 617e087, before the
stuttered rejected answers: 0.16 std, collapse at step 19)."""


def _names(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()} if path.is_dir() else set()


def legacy_demo(root: Path) -> bool:
    """An unmarked demo directory written before marker files: the demo's layout only, with its
    cached organism."""
    names = _names(root)
    return "testbed" in names and all(n in LAYOUT or (n.startswith("bai_alpha_") and n.endswith(".yaml"))
                                      for n in names)


def _is_run_dir(path: Path) -> bool:
    return owner(path) in (None, "rlhf train") and bool(_names(path) & {"config.yaml", "metrics.jsonl", MARKER})


def _legacy_sweep(sweep: Path) -> bool:
    """An unmarked ``OUT/bai_sweep`` of an older demo: ``bai merge``'s own unmarked sweep layout
    (``bai.merge.legacy_output``) plus the demo's ``eval.json``."""
    from bai.merge import legacy_output

    if not (sweep / "eval.json").is_file():
        return legacy_output(sweep)
    kids = [k for k in sweep.iterdir() if k.name != "eval.json"]
    return bool(kids) and all(k.is_dir() and k.name.startswith("alpha_") and (k / "bai_merge.yaml").is_file()
                              for k in kids)


def check_out(root: Path, alpha: float) -> None:
    """Refuse, before anything is written, a ``--out`` the demo may not use or reuse (see the
    module docstring); ``alpha`` names the BAI run directory the demo will replace."""
    from rlhf.testbed.build import BuildSpec, check_out as check_build_out

    r, cfg = root.resolve(), PPO_CONFIG.resolve()
    if r == cfg or r in cfg.parents:
        raise DemoError(f"--out: {root} {'is' if r == cfg else 'contains'} the demo's input {PPO_CONFIG}; "
                        "choose another --out")
    if root.is_symlink() and not root.exists():
        raise DemoError(f"--out: {root} is a dangling symbolic link; choose another --out")
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return
    if not root.is_dir():
        raise DemoError(f"--out: {root} exists and is not a directory; choose another --out (nothing was changed)")
    made_by = owner(root) or (COMMAND if legacy_demo(root) else None)
    if made_by != COMMAND:
        who = f"was written by `{made_by}`" if made_by else f"is not a demo directory (no {MARKER})"
        raise DemoError(f"--out: {root} {who}; the demo reuses only its own directory, so choose another "
                        "--out (nothing was changed)")
    check_build_out(root / "testbed", BuildSpec(**DEMO_SPEC), force=True)
    for name in LINKS:
        link = root / "models" / name
        if link.exists() and not link.is_symlink():
            raise DemoError(f"--out: {link} is not a link the demo made; move it away (nothing was changed)")
    sweep = root / "bai_sweep"
    if sweep.exists():
        if owner(sweep) != "bai merge" and not _legacy_sweep(sweep):
            raise DemoError(f"--out: {sweep} was not written by the demo's merge; move it away (nothing was changed)")
    report = root / "report"
    if report.exists() and owner(report) != "rlhf report" and not _names(report) <= LEGACY_REPORT:
        raise DemoError(f"--out: {report} was not written by the demo's report; move it away (nothing was changed)")
    for name in ("mix_sft", f"bai_alpha_{alpha}"):
        run = root / "ppo" / name
        if run.exists() and not _is_run_dir(run):
            raise DemoError(f"--out: {run} is not a run directory of the demo; move it away (nothing was changed)")


def link_models(root: Path) -> None:
    """``root/models/{base,instruct_sft,reasoning_sft}``: relative links into the organism (the
    directory can move); only links are replaced (``check_out`` refused anything else)."""
    links = root / "models"
    links.mkdir(parents=True, exist_ok=True)
    for name, target in LINKS.items():
        link, dest = links / name, os.path.join("..", "testbed", "models", target)
        if link.is_symlink():
            if os.readlink(link) == dest:
                continue
            link.unlink()
        elif link.exists():
            raise DemoError(f"{link}: is not a link the demo made; move it away")
        link.symlink_to(dest, target_is_directory=True)


def build_organism(root: Path, seed: int = 0) -> tuple[Path, dict]:
    """The cached demo organism under ``root/testbed`` (rebuilt when the spec changed)."""
    from rlhf.testbed.build import BuildSpec, build

    out = root / "testbed"
    report = build(out, BuildSpec(seed=seed, **DEMO_SPEC), force=True, check_connectivity=False)
    link_models(root)
    return out, report


def sweep_eval(tb: Path, dirs: list[Path]) -> list[dict]:
    """Greedy gold accuracy, think rate and length of every merged checkpoint."""
    from rlhf.testbed.build import BuildSpec, evaluate

    spec = BuildSpec(**DEMO_SPEC)
    prompts = [json.loads(l)["prompt"] for l in (tb / "data" / "eval.jsonl").read_text().splitlines()]
    return [evaluate(d, prompts, spec) for d in dirs]


def run_ppo(root: Path, tb: Path, recipe: dict, steps: int, alpha: float, seed: int) -> list[Path]:
    """PPO with the reward model on one Ray cluster: from the mix SFT model and from BAI at ``alpha``."""
    import ray
    import yaml

    from rlhf.config import load_config
    from rlhf.trainer import train

    one = {k: v for k, v in recipe.items() if k != "alphas"} | {"alpha": alpha}
    recipe_path = root / f"bai_alpha_{alpha}.yaml"
    atomic_write(recipe_path, yaml.safe_dump(one))
    models = tb / "models"
    common = [f"model.critic={models / 'rm'}", f"reward.model={models / 'rm'}",
              f"data.path={tb / 'data' / 'prompts.jsonl'}", f"trainer.total_steps={steps}", f"seed={seed}"]
    inits = {"mix_sft": [f"model.actor={models / 'mix'}"],
             # the organism's models share one tokenizer: name it (the merged actor is built later)
             f"bai_alpha_{alpha}": [f"model.bai_recipe={recipe_path}", f"model.tokenizer={models / 'base'}"]}
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    runs = []
    try:
        for name, overrides in inits.items():
            run_dir = root / "ppo" / name
            if run_dir.exists():  # the demo's own run from an earlier demo (check_out: a run directory)
                shutil.rmtree(run_dir)
            cfg = load_config(PPO_CONFIG, common + overrides + [f"run_dir={run_dir}"])
            print(f"[demo] PPO from {name} with the reward model ({steps} steps, Ray + DeepSpeed on CPU): {run_dir}",
                  flush=True)
            t = time.perf_counter()
            train(cfg)
            print(f"[demo]   {time.perf_counter() - t:.0f}s", flush=True)
            runs.append(run_dir)
    finally:
        ray.shutdown()
    return runs


def _first_last(run, key: str) -> str:
    vals = [r[key] for r in run.records if r.get(key) is not None]
    return f"{vals[0]:.2f} -> {vals[-1]:.2f}" if vals else "n/a"


def verdict_line(run) -> str:
    """One run's length-collapse verdict with the curves that explain it."""
    lc = run.verdicts["length_collapse"]
    head = (f"{run.path.name}: length collapse DETECTED at step {lc.onset_step}" if lc.verdict != "none"
            else f"{run.path.name}: no length collapse detected")
    return (f"{head} (length {_first_last(run, 'rollout/length_mean')} tokens, think rate "
            f"{_first_last(run, 'rollout/think_rate')}, RM score {_first_last(run, 'reward/mean')}, "
            f"gold accuracy {_first_last(run, 'gold/accuracy')})")


ORGANISM_PANELS = [("rollout/length_mean", "mean response length (tokens)"), ("reward/mean", "reward-model score"),
                   ("gold/accuracy", "gold accuracy (exact answer)"), ("rollout/think_rate", "non-empty trace rate")]


def organism_figure(runs: list, path: Path, keys: list[tuple[str, str]] | None = None,
                    title: str = "rlhf demo: PPO with a reward model trained on short answers "
                                 "(dotted: detected length collapse)") -> None:
    """Metrics of ``rlhf.report.load_run`` runs against step (default: length, reward-model score,
    gold accuracy, think rate), one panel per key; detected length-collapse onsets dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlhf.report import finish_step_panels

    keys = keys or ORGANISM_PANELS
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8), squeeze=False)
    axes = axes[0]
    colors = ["tab:red", "tab:blue"] + [plt.get_cmap("tab10")(i) for i in (2, 4, 1, 5, 6, 7, 8, 9)]
    for run, color in zip(runs, colors * (len(runs) // len(colors) + 1)):
        lc = run.verdicts["length_collapse"]
        label = run.path.name + (f" (collapse at step {lc.onset_step})" if lc.verdict != "none" else " (no collapse)")
        for ax, (k, _) in zip(axes, keys):
            st, vals = run.series(k)
            ax.plot(st, vals, color=color, label=label if k == keys[0][0] else None)
            if lc.verdict != "none" and lc.onset_step is not None:
                ax.axvline(lc.onset_step, color=color, ls=":", lw=1.2)
    finish_step_panels(axes, keys)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
