"""`rlhf sft`: supervised fine-tuning, full or LoRA (library: ``rlhf.sft``)."""

from __future__ import annotations

import os

from bairlhf.errors import UserError
from rlhf.sft import SFTError, load_config, read_jsonl, train


def main(argv: list[str] | None = None) -> int:
    """``rlhf sft CONFIG.yaml [--out DIR] [--force]``; bad input is an ``SFTError`` (one line, exit 2)."""
    import argparse

    from bairlhf.yamlio import load_mapping

    ap = argparse.ArgumentParser(prog="rlhf sft", description="supervised fine-tuning (full or LoRA) on DeepSpeed")
    ap.add_argument("config", help="YAML file with SFTConfig keys")
    ap.add_argument("--out", help="output directory (overrides the config's `out`)")
    ap.add_argument("--force", action="store_true", help="replace an earlier rlhf sft output in the output directory")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = ap.parse_args(argv)
    try:
        data = load_mapping(args.config, "config")
    except SFTError:
        raise
    except UserError as e:
        raise SFTError(str(e)) from None
    if args.out:
        data["out"] = args.out
    if args.force:
        data["force"] = True
    cfg = load_config(data, "sft")
    records = read_jsonl(cfg.data, [cfg.prompt_field, cfg.response_field], "sft.prompt_field/response_field")
    out = train(cfg, records)  # the data file was checked (file:line) before anything heavy is imported
    if int(os.environ.get("RANK", "0")) == 0:
        what = "LoRA adapter" if cfg.method == "lora" else "full checkpoint"
        print(f"rlhf sft: wrote the {what} (+ tokenizer, metrics.jsonl, sft_meta.json) to {out}")
    return 0
