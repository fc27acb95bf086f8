"""`bai` and `linear` outputs equal mergekit 0.1.5's linear merge of the same inputs and weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bai

pytest.importorskip("mergekit")


def state(path: Path) -> dict[str, torch.Tensor]:
    idx = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.exists() else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(str(path / f)))
    return out


def run_mergekit(models: list[tuple[Path, float]], out: Path, dtype: str, out_dtype: str) -> Path:
    """mergekit's linear merge, through its Python API (as `mergekit-yaml --no-cuda --copy-tokenizer`)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    cfg = MergeConfiguration.model_validate({
        "merge_method": "linear", "dtype": dtype, "out_dtype": out_dtype,
        "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in models]})
    run_merge(cfg, str(out), MergeOptions(cuda=False, copy_tokenizer=True, quiet=True, lazy_unpickle=False))
    return out


@pytest.fixture(scope="module")
def mergekit_bai(tiny_family, tmp_path_factory):
    """mergekit on the BAI recipe rewritten as one linear merge: [alpha, (1-alpha) w_1, (1-alpha) w_2]."""
    root = tmp_path_factory.mktemp("mergekit")
    models = [(tiny_family["base"], 0.3), (tiny_family["sft_a"], 0.7 * 0.25), (tiny_family["sft_b"], 0.7 * 0.75)]
    return {"float32": run_mergekit(models, root / "f32", "float32", "float32"),
            "bfloat16": run_mergekit(models, root / "bf16", "float32", "bfloat16")}


def recipe(fam, dtype):
    return {"method": "bai", "base": str(fam["base"]), "alpha": 0.3, "dtype": dtype,
            "sft_models": [{"path": str(fam["sft_a"]), "weight": 0.25}, {"path": str(fam["sft_b"]), "weight": 0.75}]}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bai_equals_mergekit_linear(tiny_family, mergekit_bai, tmp_path, dtype):
    ours = state(bai.merge(recipe(tiny_family, dtype), tmp_path / "ours", progress=False)[0])
    theirs = state(mergekit_bai[dtype])
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype == getattr(torch, dtype)
        a, b = ours[k].float(), theirs[k].float()
        if dtype == "float32":    # float32 rounding of a different summation order
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), k
        else:                     # identical float32 values round to identical bf16; near-ties may differ by 1 ulp
            assert torch.allclose(a, b, rtol=2.0 ** -8, atol=1e-7), k
            assert (a != b).float().mean() < 0.01, k


def test_sweep_and_linear_equal_mergekit(tiny_family, mergekit_bai, tmp_path):
    sweep = dict(recipe(tiny_family, "float32"), alphas=[0.3, 0.6])
    del sweep["alpha"]
    ours = state(bai.merge(sweep, tmp_path / "sweep", progress=False)[0])
    theirs = state(mergekit_bai["float32"])
    assert all(torch.allclose(ours[k], theirs[k], rtol=1e-6, atol=1e-7) for k in theirs)
    lin = {"method": "linear", "dtype": "float32",
           "models": [{"path": str(tiny_family["sft_a"]), "weight": 0.4}, {"path": str(tiny_family["sft_b"]), "weight": 0.6}]}
    ours = state(bai.merge(lin, tmp_path / "lin", progress=False)[0])
    theirs = state(run_mergekit([(tiny_family["sft_a"], 0.4), (tiny_family["sft_b"], 0.6)], tmp_path / "mk",
                                "float32", "float32"))
    assert all(torch.allclose(ours[k], theirs[k], rtol=1e-6, atol=1e-7) for k in theirs)
