"""A two-stage BAI merge of the real pretrained model (SmolLM2-135M-Instruct, bf16) with two
perturbed copies equals the arithmetic and mergekit 0.1.5, and the result loads and generates."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import bai

pytestmark = pytest.mark.slow

ALPHA, W = 0.3, (0.25, 0.75)


def _perturbed(src: Path, out: Path, seed: int) -> Path:
    """A copy of ``src`` whose every tensor moved by 1% of its own std (a stand-in SFT model)."""
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    g = torch.Generator().manual_seed(seed)
    sd = load_file(str(src / "model.safetensors"))
    noisy = {k: (v.float() + 0.01 * v.float().std() * torch.randn(v.shape, generator=g)).to(v.dtype)
             for k, v in sd.items()}
    save_file(noisy, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def family(real_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("real_family")
    return {"base": real_model, "sft_a": _perturbed(real_model, root / "sft_a", 1),
            "sft_b": _perturbed(real_model, root / "sft_b", 2)}


def _state(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _close_bf16(a: torch.Tensor, b: torch.Tensor, key: str) -> None:
    """Equal float32 sums round to equal bf16; a different summation order may flip near-ties by 1 ulp."""
    a, b = a.float(), b.float()
    assert torch.allclose(a, b, rtol=2.0 ** -7, atol=1e-7), key  # at most 1 bf16 ulp
    assert (a != b).float().mean() < 0.01, key


def test_real_bai_merge_equals_arithmetic_and_mergekit(family, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    recipe = {"method": "bai", "base": str(family["base"]), "alpha": ALPHA, "dtype": "bfloat16",
              "sft_models": [{"path": str(family["sft_a"]), "weight": W[0]},
                             {"path": str(family["sft_b"]), "weight": W[1]}]}
    ours_dir = bai.merge(recipe, tmp_path / "ours", progress=False)[0]
    ours = _state(ours_dir)
    base, a, b = (_state(family[k]) for k in ("base", "sft_a", "sft_b"))
    assert set(ours) == set(base) and "lm_head.weight" not in ours      # tied embeddings stay tied
    for k, v in base.items():                                              # paper eq. 1-2, in float32
        want = (ALPHA * v.float() + (1 - ALPHA) * (W[0] * a[k].float() + W[1] * b[k].float())).to(torch.bfloat16)
        assert ours[k].dtype == torch.bfloat16
        _close_bf16(ours[k], want, k)

    cfg = MergeConfiguration.model_validate({
        "merge_method": "linear", "dtype": "float32", "out_dtype": "bfloat16",
        "models": [{"model": str(family["base"]), "parameters": {"weight": ALPHA}},
                   {"model": str(family["sft_a"]), "parameters": {"weight": (1 - ALPHA) * W[0]}},
                   {"model": str(family["sft_b"]), "parameters": {"weight": (1 - ALPHA) * W[1]}}]})
    run_merge(cfg, str(tmp_path / "mergekit"), MergeOptions(cuda=False, copy_tokenizer=True, quiet=True))
    theirs = _state(tmp_path / "mergekit")
    for k in ours:
        _close_bf16(ours[k], theirs[k], k)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(ours_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(ours_dir))
    assert model.dtype == torch.bfloat16 and model.config.tie_word_embeddings
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert reply.strip(), "the merged real model generated nothing"
