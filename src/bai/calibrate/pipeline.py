"""``bai calibrate CONFIG.yaml --out DIR``: SFT with an empty trace, search, final checkpoint, report.

Run directory layout (``DIR``)::

    config.yaml            resolved config (a rerun must match it; --force starts over)
    sft_train.jsonl        the serialized SFT records (messages + empty trace + output)
    sft/                   adapter (LoRA) or full checkpoint; complete when sft/sft_meta.json exists
    probes.csv / .jsonl    every probe: sft_weight, rho, seconds, estimator details
    rho_vs_sft_weight.png  rho against the SFT weight
    model/                 M_a* as a full Hugging Face checkpoint (safetensors)
    report.json / .md      alpha*, rho at alpha*, timings, paths

Resumable after the SFT step: a rerun with the same config reuses ``sft/`` and redoes only the
search and the final checkpoint. Every input is checked before any work (files, fields,
tokenizer markers, value ranges); a bad one stops with one message naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

from rlhf import sft as sft_mod

from . import data as data_mod
from . import estimators as est
from . import merging, search
from .config import CalibrateConfig, load_config, to_dict


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def preflight(cfg: CalibrateConfig):
    """All checks that need the files: data fields, tokenizer markers, decision path vs prefix window.

    Returns (tokenizer, train records, calibration records).
    """
    from transformers import AutoTokenizer

    train, cal = data_mod.load_records(cfg)
    tok = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"model: tokenizer at {cfg.model} has no chat_template")
    data_mod.marker_id(tok, cfg.reasoning.start, "reasoning.start")
    data_mod.marker_id(tok, cfg.reasoning.end, "reasoning.end")
    records = data_mod.sft_records(train, cfg)
    sft_mod.validate_config(sft_config(cfg, Path(".")), "config.sft", need_paths=False)
    sft_mod.tokenize_example(tok, records[0]["messages"], records[0]["response"], cfg.reasoning.start)
    path = data_mod.decision_path(tok, data_mod.build_messages(cal[0], cfg), cfg)
    if cfg.estimator.prefix_tokens < len(path.ids) and (cfg.estimator.method == "prefix" or cfg.estimator.compare):
        raise ValueError(f"estimator.prefix_tokens: {cfg.estimator.prefix_tokens} is shorter than the empty path "
                         f"({len(path.ids)} tokens); the prefix cannot see the trace close")
    return tok, train, cal


def sft_config(cfg: CalibrateConfig, out: Path) -> sft_mod.SFTConfig:
    """The ``rlhf.sft`` config of the SFT step."""
    s = cfg.sft
    kw = {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name != "preset"}  # same-named fields
    kw.update(model=cfg.model, data=str(out / "sft_train.jsonl"), out=str(out / "sft"), prompt_field="messages",
              response_field="response", reasoning_start=cfg.reasoning.start,
              micro_batch_size=min(s.micro_batch_size, s.batch_size), seed=cfg.seed, force=True)
    return sft_mod.SFTConfig(**kw)


def _prepare_out(cfg: CalibrateConfig, out: Path, force: bool) -> None:
    resolved = to_dict(cfg)
    if out.exists() and force:
        shutil.rmtree(out)
    if out.exists():
        saved_path = out / "config.yaml"
        if not saved_path.is_file():
            raise ValueError(f"--out: {out} exists and is not a calibration run directory; pass --force to replace it")
        saved = yaml.safe_load(saved_path.read_text()) or {}
        for key in ("model", "train_data", "input_field", "output_field", "prompt_template", "system_prompt",
                    "reasoning", "sft", "seed"):
            if saved.get(key) != resolved.get(key):
                raise ValueError(f"--out: {out} holds a run with a different `{key}`; pass --force to start over")
        if (out / "model").exists():
            raise ValueError(f"--out: {out} already holds a finished calibration (model/); pass --force to redo it")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))


def run_sft(cfg: CalibrateConfig, out: Path, train: list[dict]) -> dict:
    """Step 1: SFT on empty-trace targets (skipped when ``out/sft`` is complete)."""
    meta_path = out / "sft" / "sft_meta.json"
    if meta_path.is_file():
        print(f"[calibrate] reusing finished SFT in {out / 'sft'}")
        return {**json.loads(meta_path.read_text()), "reused": True}
    records = data_mod.sft_records(train, cfg)
    (out / "sft_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    sft_mod.train(sft_config(cfg, out), records)
    return {**json.loads(meta_path.read_text()), "reused": False}


def make_evaluator(cfg: CalibrateConfig, out: Path, tok, cal: list[dict]):
    """``evaluate(a) -> (rho, extra)`` for the search, on M_a built from the SFT output."""
    e = cfg.estimator
    dev = _device(e.device)
    if cfg.sft.method == "lora":
        model = merging.load_lora(cfg.model, out / "sft", dev, e.dtype)
        at = lambda a: merging.lora_at(model, a)  # noqa: E731
    else:
        at = lambda a: merging.full_at(cfg.model, out / "sft", a, out / ".probes", dev, e.dtype)  # noqa: E731
    prompts, paths = data_mod.calibration_prompts(tok, cal, cfg)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ws = est.whitespace_token_ids(tok)

    def estimate(m, method: str) -> est.RateEstimate:
        if method == "logit":
            return est.logit_rate(m, prompts, paths, pad_id=pad, batch_size=e.batch_size,
                                  threshold=e.threshold, statistic=e.statistic)
        return est.sample_rate(m, prompts, paths, pad_id=pad, eos_id=tok.eos_token_id, whitespace_ids=ws,
                               max_new_tokens=e.prefix_tokens, samples=e.samples, temperature=e.temperature,
                               batch_size=e.batch_size, threshold=e.threshold, seed=cfg.seed)

    def evaluate(a: float):
        with at(a) as m:
            r = estimate(m, e.method)
            extra = {"estimator": r.estimator, "rho_mean": r.rho_mean, "rho_count": r.rho_count,
                     "forward_calls": r.forward_calls, "forward_rows": r.forward_rows,
                     "estimate_seconds": r.seconds}
            if e.compare:
                other = estimate(m, "prefix" if e.method == "logit" else "logit")
                extra.update({f"{other.estimator}_rho": other.rho, f"{other.estimator}_rho_mean": other.rho_mean,
                              f"{other.estimator}_rho_count": other.rho_count,
                              f"{other.estimator}_seconds": other.seconds})
        print(f"[calibrate] sft_weight={a:.4f} rho={r.rho:.4f} ({r.estimator}, {r.seconds:.2f}s)")
        return r.rho, extra

    return evaluate


def run(cfg: CalibrateConfig, out: str | Path, force: bool = False) -> dict:
    """The whole pipeline; returns the report (also written to ``out/report.json``)."""
    out = Path(out)
    tok, train, cal = preflight(cfg)
    _prepare_out(cfg, out, force)
    t0 = time.perf_counter()
    sft_meta = run_sft(cfg, out, train)
    t_sft = time.perf_counter() - t0

    t1 = time.perf_counter()
    evaluate = make_evaluator(cfg, out, tok, cal)
    s = cfg.search
    if s.method == "grid":
        result = search.grid_search(evaluate, s.grid_k, s.rho_min)
    else:
        result = search.binary_search(evaluate, s.rho_min, s.max_steps, s.early_stop)
    t_search = time.perf_counter() - t1
    search.write_table(result, out)
    search.plot(result, out / "rho_vs_sft_weight.png",
                title=f"{result.method} search, {cfg.estimator.method} estimator, {len(cal)} prompts")

    t2 = time.perf_counter()
    if (out / "model").exists():
        shutil.rmtree(out / "model")
    writer = merging.write_lora_merge if cfg.sft.method == "lora" else merging.write_full_merge
    writer(cfg.model, out / "sft", result.sft_weight, out / "model")
    t_write = time.perf_counter() - t2

    report = {
        "sft_weight": result.sft_weight,
        "convention": "M_a = (1 - a) * M + a * M_sft; sft_weight is a, the weight of the SFT model",
        "rho_at_sft_weight": result.rho,
        "rho_min": s.rho_min,
        "search": {"method": result.method, "probes": len(result.probes), "stop_reason": result.stop_reason},
        "estimator": cfg.estimator.method,
        "calibration_prompts": len(cal),
        "seconds": {"sft": t_sft, "search": t_search, "write": t_write},
        "sft": {k: sft_meta.get(k) for k in ("examples", "dropped_too_long", "optimizer_steps", "final_loss",
                                              "seconds", "reused")},
        "probes": [dataclasses.asdict(p) for p in result.probes],
        "paths": {"model": str(out / "model"), "sft": str(out / "sft"), "probes": str(out / "probes.csv"),
                  "plot": str(out / "rho_vs_sft_weight.png")},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(report))
    return report


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _markdown(r: dict) -> str:
    lines = [
        "# Calibration report", "",
        f"- alpha* (sft_weight) = **{r['sft_weight']:.4f}**, rho = {_fmt(r['rho_at_sft_weight'])}, "
        f"rho_min = {r['rho_min']}",
        f"- {r['convention']}",
        f"- search: {r['search']['method']}, {r['search']['probes']} probes ({r['search']['stop_reason']}); "
        f"estimator: {r['estimator']} on {r['calibration_prompts']} prompts",
        f"- time: SFT {r['seconds']['sft']:.1f}s, search {r['seconds']['search']:.1f}s, "
        f"write {r['seconds']['write']:.1f}s", "",
        "| step | sft_weight | rho | seconds |", "|---:|---:|---:|---:|",
    ]
    lines += [f"| {p['step']} | {p['sft_weight']:.4f} | {p['rho']:.4f} | {p['seconds']:.2f} |" for p in r["probes"]]
    lines += ["", "![rho vs sft_weight](rho_vs_sft_weight.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``bai calibrate CONFIG.yaml --out DIR [--force]``."""
    ap = argparse.ArgumentParser(prog="bai calibrate",
                                 description="SFT with an empty reasoning trace, then merge back at the largest "
                                             "SFT weight whose calibration reasoning rate stays >= rho_min")
    ap.add_argument("config", help="YAML config (see configs/calibrate/)")
    ap.add_argument("--out", required=True, help="run directory (resumed after the SFT step if it exists)")
    ap.add_argument("--force", action="store_true", help="discard an existing run directory and start over")
    args = ap.parse_args(argv)
    try:
        raw = yaml.safe_load(Path(args.config).read_text()) or {}
        cfg = load_config(raw, "config")
        report = run(cfg, args.out, force=args.force)
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"bai calibrate: {e}", file=sys.stderr)
        return 2
    print(f"alpha* (sft_weight) = {report['sft_weight']:.4f}, rho = {_fmt(report['rho_at_sft_weight'])}; "
          f"model written to {report['paths']['model']}")
    return 0
