"""Benchmark: the paper's fast calibration against its baseline, on a tiny model, in one run.

Builds a tiny reasoner (Llama, hidden 64, 2 layers, prefill template) with ``rlhf sft``, SFTs it
on empty-trace targets with ``bai calibrate`` (LoRA), then searches the SFT weight on the same
calibration prompts and the same adapter two ways:

  fast:      logit estimator (one forward pass per prompt) + binary search with early stop
  baseline:  sampled full responses (one per prompt, until EOS or --max-new-tokens) + grid K=10

and prints, for each, the forward calls, the sequences processed (rows summed over calls), the
wall time, alpha* and the ratio baseline / fast. Both use the same batch size.

    python benchmarks/calibrate_speed.py                 # --workdir /tmp/calib_bench --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build(work: Path) -> dict:
    """Tiny reasoner + LoRA empty-trace SFT (reused when ``work`` already holds them)."""
    from rlhf.calibrate import load_config, run
    from rlhf import sft, tiny

    raw_path = work / "calib.json"
    if raw_path.is_file() and (work / "run" / "sft" / "sft_meta.json").is_file():
        return json.loads(raw_path.read_text())
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tok = tiny.train_tokenizer(template="prefill")
    base = tiny.make_tiny_model(work / "base", tokenizer=tok, hidden_size=64, num_layers=2)
    pairs = [(a, b) for a in range(10) for b in range(10)]
    q = "What is {} plus {}?".format
    reason = [{"prompt": q(a, b), "response": f"<think>\n{a}+{b}={a + b}\n</think>\n\n{a + b}"} for a, b in pairs]
    sft.train(sft.SFTConfig(model=str(base), out=str(work / "reasoner"), method="full", epochs=10, lr=3e-3,
                            batch_size=16, micro_batch_size=16, warmup_ratio=0.0), reason)
    (work / "train.jsonl").write_text("".join(json.dumps({"input": q(a, b), "output": str(a + b)}) + "\n"
                                              for a, b in pairs[::2]))
    (work / "cal.jsonl").write_text("".join(json.dumps({"input": q(a, b)}) + "\n" for a, b in pairs[1::2]))
    raw = {"model": str(work / "reasoner"), "train_data": str(work / "train.jsonl"),
           "cal_data": str(work / "cal.jsonl"),
           "sft": {"method": "lora", "epochs": 5, "lr": 1e-2, "batch_size": 16, "micro_batch_size": 16,
                   "warmup_ratio": 0.0, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}}
    run(load_config(raw), work / "run")
    raw_path.write_text(json.dumps(raw))
    return raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/calib_bench")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each search (median reported)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="full-response budget of the baseline")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--grid-k", type=int, default=10)
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from rlhf.calibrate import data as data_mod
    from rlhf.calibrate import estimators as est
    from rlhf.calibrate import load_config, merging, search

    work = Path(args.workdir)
    raw = build(work)
    cfg = load_config(raw)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    model = merging.load_lora(cfg.model, work / "run" / "sft", "cpu", "float32")
    _, cal = data_mod.load_records(cfg)
    prompts, paths = data_mod.calibration_prompts(tok, cal, cfg)
    ws = est.whitespace_token_ids(tok)
    pad, eos, bs = tok.pad_token_id, tok.eos_token_id, args.batch_size

    def evaluator(kind: str, totals: dict):
        def evaluate(a: float):
            with merging.lora_at(model, a):
                if kind == "fast":
                    r = est.logit_rate(model, prompts, paths, pad_id=pad, batch_size=bs)
                else:
                    r = est.sample_rate(model, prompts, paths, pad_id=pad, eos_id=eos, whitespace_ids=ws,
                                        max_new_tokens=args.max_new_tokens, samples=1, temperature=1.0,
                                        batch_size=bs, estimator="full")
            totals["calls"] += r.forward_calls
            totals["rows"] += r.forward_rows
            totals["tokens"] += r.generated_tokens
            return r.rho, {}
        return evaluate

    def timed(kind: str):
        walls, last = [], None
        for _ in range(args.repeats):
            totals = {"calls": 0, "rows": 0, "tokens": 0}
            t0 = time.perf_counter()
            if kind == "fast":
                res = search.binary_search(evaluator(kind, totals), 0.9, 8, True)
            else:
                res = search.grid_search(evaluator(kind, totals), args.grid_k, 0.9)
            walls.append(time.perf_counter() - t0)
            last = (res, totals)
        return statistics.median(walls), last[0], last[1]

    torch.manual_seed(0)
    timed("fast")  # warm-up (allocator, first-call overheads)
    fast_t, fast_r, fast_n = timed("fast")
    base_t, base_r, base_n = timed("baseline")
    print(f"tiny Llama (hidden 64, 2 layers), {len(prompts)} calibration prompts, batch {bs}, "
          f"torch threads {torch.get_num_threads()}, median of {args.repeats}")
    fmt = "  {:<44} probes {:>2}  forward calls {:>5}  rows {:>6}  wall {:>8.3f} s  alpha* {:.4f}"
    print(fmt.format("fast: logit estimator + binary search", len(fast_r.probes), fast_n["calls"],
                     fast_n["rows"], fast_t, fast_r.sft_weight))
    print(fmt.format(f"baseline: full responses + grid K={args.grid_k}", len(base_r.probes), base_n["calls"],
                     base_n["rows"], base_t, base_r.sft_weight)
          + f"  ({base_n['tokens']} tokens sampled)")
    print(f"ratio baseline / fast: forward calls {base_n['calls'] / fast_n['calls']:.1f}x, "
          f"rows {base_n['rows'] / fast_n['rows']:.1f}x, wall time {base_t / fast_t:.1f}x")
    print("probes fast:     " + ", ".join(f"{p.sft_weight:.4f}->{p.rho:.3f}" for p in fast_r.probes))
    print("probes baseline: " + ", ".join(f"{p.sft_weight:.2f}->{p.rho:.2f}" for p in base_r.probes))


if __name__ == "__main__":
    main()
