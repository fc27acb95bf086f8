"""``rlhf demo``: the README's main job on the CPU (interim: the BAI merge part of the pipeline).

Builds tiny generated checkpoints (a base model and two fine-tuned relatives standing in for the
instruction-following and reasoning SFT models), runs the paper's 9-ratio BAI sweep in one
pass, loads one merged actor initialization with ``AutoModelForCausalLM`` and prints where
everything is. Nothing is downloaded.
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
    print(f"[demo] done in {time.perf_counter() - t0:.1f}s; merge your own checkpoints with "
          f"`bai merge configs/merge/bai_sweep.yaml --out DIR`")
    return 0
