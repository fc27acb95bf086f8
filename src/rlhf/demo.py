"""``rlhf demo``: the README's main job on the CPU: BAI merge -> PPO on Ray -> report figures.

Builds tiny generated checkpoints (a base model and two fine-tuned relatives standing in for the
instruction-following and reasoning SFT models), runs the paper's 9-ratio BAI sweep in one
pass, loads one merged actor initialization with ``AutoModelForCausalLM``, then runs PPO twice
on one local Ray cluster (DeepSpeed on CPU, the tiny config's rule-based reward): once from the
reasoning SFT model alone and once from a BAI recipe (alpha = 0.5, merged by the trainer
itself), and draws the paper's figures for both runs with ``rlhf report``. Prints the
TensorBoard command and the figure paths. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ALPHAS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def build_models(root: Path) -> dict[str, Path]:
    """Tiny Llama base plus two perturbed relatives under ``root`` (reused when already there)."""
    from rlhf import tiny

    paths = {n: root / n for n in ("base", "instruct_sft", "reasoning_sft")}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    tok = tiny.train_tokenizer()
    tiny.make_tiny_model(paths["base"], arch="llama", tokenizer=tok, seed=0)
    tiny.perturbed_copy(paths["base"], paths["instruct_sft"], seed=1)
    tiny.perturbed_copy(paths["base"], paths["reasoning_sft"], seed=2)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rlhf demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo", help="demo directory (default: ./runs/demo)")
    ap.add_argument("--steps", type=int, default=30, help="PPO steps per run (default: 30)")
    args = ap.parse_args(argv)
    root = Path(args.out).resolve()

    import bai

    t0 = time.perf_counter()
    models = build_models(root / "models")
    print(f"[demo] tiny checkpoints: {root / 'models'} (base, instruct_sft, reasoning_sft)")
    recipe = {"method": "bai", "base": str(models["base"]), "alphas": ALPHAS, "dtype": "bfloat16",
              "sft_models": [{"path": str(models["instruct_sft"]), "weight": 0.5},
                             {"path": str(models["reasoning_sft"]), "weight": 0.5}]}
    dirs = bai.merge(recipe, root / "bai_sweep", force=True)
    print(f"[demo] BAI sweep (alpha = weight of the base) in one pass: {len(dirs)} checkpoints in {root / 'bai_sweep'}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    pick = root / "bai_sweep" / "alpha_0.5"
    model = AutoModelForCausalLM.from_pretrained(str(pick))
    tok = AutoTokenizer.from_pretrained(str(pick))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 12 plus 30?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    n_new = gen.shape[1] - ids["input_ids"].shape[1]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[demo] loaded {pick.name} with AutoModelForCausalLM ({n_params:,} params, {model.dtype}) "
          f"and generated {n_new} tokens from a chat prompt")
    print(f"[demo] recipe and input fingerprints: {pick / 'bai_merge.yaml'}")
    runs = run_ppo(root, models, recipe, args.steps)

    from rlhf.report import write_report

    report = write_report(runs, root / "report", force=True)
    print(f"[demo] figures: " + ", ".join(str(report / f) for f in
                                          ("reward_buckets.png", "reward.png", "length.png", "kl.png")))
    print(f"[demo] summary: {report / 'summary.md'}")
    print(f"[demo] TensorBoard: tensorboard --logdir {root / 'ppo'}")
    print(f"[demo] done in {time.perf_counter() - t0:.1f}s; merge your own checkpoints with "
          f"`bai merge configs/merge/bai_sweep.yaml --out DIR`, train with `rlhf train CONFIG.yaml`")
    return 0


def run_ppo(root: Path, models: dict[str, Path], recipe: dict, steps: int) -> list[Path]:
    """Two PPO runs of the tiny CPU config on one Ray cluster: SFT init and BAI (alpha 0.5) init."""
    import shutil

    import ray
    import yaml

    from rlhf.config import load_config
    from rlhf.trainer import train

    one = {k: v for k, v in recipe.items() if k != "alphas"} | {"alpha": 0.5}
    recipe_path = root / "bai_alpha_0.5.yaml"
    recipe_path.write_text(yaml.safe_dump(one))
    inits = {"sft_init": [f"model.actor={models['reasoning_sft']}"],
             "bai_alpha_0.5": [f"model.bai_recipe={recipe_path}"]}
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    runs = []
    try:
        for name, overrides in inits.items():
            run_dir = root / "ppo" / name
            shutil.rmtree(run_dir, ignore_errors=True)  # the demo's own output from an earlier demo
            cfg = load_config(None, overrides + [f"run_dir={run_dir}", f"trainer.total_steps={steps}"])
            print(f"[demo] PPO from {name} ({steps} steps, Ray + DeepSpeed on CPU): {run_dir}")
            train(cfg)
            runs.append(run_dir)
    finally:
        ray.shutdown()
    return runs
