"""Evaluating and writing M_a = (1 - a) M + a M_sft, where a (``sft_weight``) weighs the SFT model.

LoRA SFT: M_sft = M + dW, so M_a = M + a dW. Candidates are evaluated by scaling the adapter
by a (peft ``rescale_adapter_scale``, exact for plain LoRA, "wise-ft"); no merged weights are
materialised. Only the chosen model is written, as a full Hugging Face checkpoint.

Full SFT: every candidate, and the chosen model, is streamed through ``bai.merge``
(``method: linear`` with weights [1 - a, a], float32 arithmetic, the original dtype on disk);
a candidate lives in a scratch directory only while it is evaluated.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch

from rlhf.sft import load_model


def load_lora(model_path: str, adapter_dir: str | Path, device: str, dtype: str):
    """The original model with the SFT adapter attached (scale 1 = M_sft), in eval mode."""
    from peft import PeftModel

    base = load_model(model_path, dtype)
    return PeftModel.from_pretrained(base, str(adapter_dir)).to(device).eval()


@contextlib.contextmanager
def lora_at(model, sft_weight: float):
    """Temporarily scale every LoRA adapter by ``sft_weight``: the model computes M_a."""
    from peft.helpers import rescale_adapter_scale

    with rescale_adapter_scale(model, float(sft_weight)):
        yield model


@contextlib.contextmanager
def full_at(model_path: str, sft_path: str | Path, sft_weight: float, work: Path, device: str, dtype: str):
    """M_a of a full SFT for the duration of the block: streamed through ``bai.merge`` into
    ``work``, loaded, and deleted afterwards (one model in memory at a time)."""
    probe = Path(work) / f"probe-{sft_weight:.8f}"
    shutil.rmtree(probe, ignore_errors=True)
    write_full_merge(model_path, sft_path, sft_weight, probe)
    try:
        yield load_model(probe, dtype).to(device).eval()
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def _tmp_sibling(out: Path) -> Path:
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def write_lora_merge(model_path: str, adapter_dir: str | Path, sft_weight: float, out: Path) -> Path:
    """Write M_a (adapter scaled by a, merged into the weights) as a full safetensors checkpoint."""
    from transformers import AutoTokenizer

    model = load_lora(model_path, adapter_dir, "cpu", _config_dtype(model_path))
    tmp = _tmp_sibling(out)
    with lora_at(model, sft_weight):
        merged = model.merge_and_unload()
    merged.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(model_path, local_files_only=True).save_pretrained(str(tmp))
    tmp.rename(out)
    return out


def _config_dtype(model_path: str) -> str:
    import json

    cfg = json.loads(Path(model_path, "config.json").read_text())
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def write_full_merge(model_path: str, sft_path: str | Path, sft_weight: float, out: Path) -> Path:
    """Write M_a for a full SFT by streaming through ``bai.merge`` (``method: linear``, weights [1 - a, a]).

    The output keeps the original checkpoint's dtype (``bai.merge`` accumulates in float32).
    """
    from bai.merge import merge

    recipe = {"method": "linear", "dtype": _config_dtype(model_path),
              "models": [{"path": str(model_path), "weight": 1.0 - float(sft_weight)},
                         {"path": str(sft_path), "weight": float(sft_weight)}]}
    merge(recipe, str(out), force=False)
    return out
