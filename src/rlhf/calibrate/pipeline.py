"""``bai calibrate CONFIG.yaml --out DIR``: SFT with an empty trace, search, final checkpoint, report.

Run directory layout (``DIR``)::

    .bai-rlhf-output.json  marker: written by `bai calibrate` (bairlhf.outputs)
    config.yaml            resolved config (a resumed run must match it)
    sft_train.jsonl        the serialized SFT records (messages + empty trace + output)
    sft/                   adapter (LoRA) or full checkpoint; complete when sft/sft_meta.json exists
    probes.csv / .jsonl    every probe: sft_weight, rho, seconds, estimator details
    rho_vs_sft_weight.png  rho against the SFT weight
    model/                 M_a* as a full Hugging Face checkpoint (safetensors)
    report.json / .md      alpha*, rho at alpha*, timings, paths

Every input is checked before anything is written (files, fields, tokenizer markers, the model's
weight headers, value ranges, the output directory); a bad one stops with one message naming it.

Outputs (``bairlhf.outputs``): a run is built in a temporary sibling ``.DIR.tmp-calibrate-PID``
and renamed to DIR when complete, so DIR only ever holds a finished run. ``--force`` replaces an
existing DIR only when ``bai calibrate`` wrote it (its marker, or ``config.yaml`` plus
``sft_train.jsonl`` for runs of versions before markers) and only once the new run is complete;
DIR may never be, contain or lie inside the model, a data file or the config file.

Resume: a run killed after its SFT step leaves the temporary sibling with a complete ``sft/``;
the next run with the same config (without ``--force``) adopts it and redoes only the search and
the final checkpoint. Any other leftover of a dead run is removed. An existing DIR without a
finished ``model/`` (e.g. removed by hand) with the same config is resumed in place the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import yaml

from bairlhf.errors import UserError
from bairlhf.outputs import MARKER, check_output, dead_leftovers, mark_output, owner, replace_dir
from bairlhf.yamlio import load_mapping
from rlhf import sft as sft_mod

from . import data as data_mod
from . import estimators as est
from . import merging, search
from .config import CalibrateConfig, CalibrateError, to_dict

COMMAND = "bai calibrate"
"""The command name in the output marker."""
RESUME_KEYS = ("model", "train_data", "input_field", "output_field", "prompt_template", "system_prompt",
               "reasoning", "sft", "seed")
"""Config keys a resumed run must share with the run it continues (those that shape the SFT)."""


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def preflight(cfg: CalibrateConfig):
    """All checks that need the files: data fields, tokenizer markers, model weight headers, LoRA
    targets, decision path vs prefix window. Writes nothing; raises a ``UserError`` naming the culprit.

    Returns (tokenizer, train records, calibration records).
    """
    from transformers import AutoTokenizer

    from bai.io import open_checkpoint

    train, cal = data_mod.load_records(cfg)
    ckpt = open_checkpoint(Path(cfg.model), key="config.model")    # config.json and every weight header
    if cfg.sft.method == "lora":
        missing = [t for t in cfg.sft.lora.targets if not any(f".{t}." in n for n in ckpt.tensors)]
        if missing:
            raise CalibrateError(f"config.sft.lora.targets: model {cfg.model} has no module named {missing}")
    try:
        tok = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CalibrateError(f"config.model: cannot load the tokenizer of {cfg.model}: "
                             f"{' '.join(str(e).split())[:200]}") from None
    if not getattr(tok, "chat_template", None):
        raise CalibrateError(f"config.model: tokenizer at {cfg.model} has no chat_template")
    data_mod.marker_id(tok, cfg.reasoning.start, "config.reasoning.start")
    data_mod.marker_id(tok, cfg.reasoning.end, "config.reasoning.end")
    records = data_mod.sft_records(train, cfg)
    sft_cfg = dataclasses.replace(sft_config(cfg, Path(".")), data=cfg.train_data)
    try:   # rlhf.sft's own checks (its errors are ValueErrors), on exactly what the SFT step will see
        sft_mod.validate_config(sft_cfg, "config.sft", need_paths=False)
    except ValueError as e:
        raise CalibrateError(str(e)) from None
    try:
        sft_mod.build_examples(tok, records, sft_cfg)     # every record tokenizes; not all are too long
    except ValueError as e:
        msg = str(e)
        raise CalibrateError(f"config.{msg}" if msg.startswith("sft.") else
                             f"{msg} (config.reasoning.empty_trace must continue the chat template's prefill)"
                             ) from None
    path = data_mod.decision_path(tok, data_mod.build_messages(cal[0], cfg), cfg)
    if cfg.estimator.prefix_tokens < len(path.ids) and (cfg.estimator.method == "prefix" or cfg.estimator.compare):
        raise CalibrateError(f"config.estimator.prefix_tokens: {cfg.estimator.prefix_tokens} is shorter than the empty "
                             f"path ({len(path.ids)} tokens); the prefix cannot see the trace close")
    return tok, train, cal


def sft_config(cfg: CalibrateConfig, out: Path) -> sft_mod.SFTConfig:
    """The ``rlhf.sft`` config of the SFT step."""
    s = cfg.sft
    kw = {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name != "preset"}  # same-named fields
    kw["lora"] = dataclasses.replace(s.lora)   # the same rlhf.sft.LoraSettings; a copy
    kw.update(model=cfg.model, data=str(out / "sft_train.jsonl"), out=str(out / "sft"), prompt_field="messages",
              response_field="response", reasoning_start=cfg.reasoning.start,
              micro_batch_size=min(s.micro_batch_size, s.batch_size), seed=cfg.seed, force=True)
    return sft_mod.SFTConfig(**kw)


def legacy_run(path: Path) -> bool:
    """A run directory of ``bai calibrate`` from before marker files: ``config.yaml`` and ``sft_train.jsonl``."""
    return (path / "config.yaml").is_file() and (path / "sft_train.jsonl").is_file()


def _same_run(saved: dict, resolved: dict) -> str | None:
    """The first ``RESUME_KEYS`` key whose value differs between two resolved configs (None: same)."""
    return next((k for k in RESUME_KEYS if saved.get(k) != resolved.get(k)), None)


def _saved_config(run_dir: Path) -> dict:
    return load_mapping(run_dir / "config.yaml", "saved run config")


def _leftovers(out: Path) -> list[tuple[str, Path]]:
    """(kind, path) of the temporaries of dead earlier runs on ``out``: ``tmp`` (a run being
    built) or ``old`` (an old DIR a killed ``--force`` run had moved aside, ``replace_dir``)."""
    return [("tmp" if kind == "tmp-calibrate" else "old", sib)
            for kind, sib in dead_leftovers(out, ("tmp-calibrate", "old"))]


def _prepare_out(cfg: CalibrateConfig, out: Path, force: bool, inputs: list) -> Path:
    """Check the output directory (before any write), then return the directory to work in.

    ``out`` missing (or ``force``): a fresh temporary sibling, or, without ``force``, the one a
    killed run with the same config left after finishing its SFT (adopted). ``out`` present
    without ``force``: ``out`` itself, when it is an unfinished run of the same config.
    """
    resolved = to_dict(cfg)
    in_place = out.exists() and not force
    check_output(out, COMMAND, inputs, force=force or in_place, legacy=legacy_run)
    if in_place:
        if not (out / "config.yaml").is_file():
            raise CalibrateError(f"{out}: exists and is not a calibration run directory (no config.yaml)")
        key = _same_run(_saved_config(out), resolved)
        if key is not None:
            raise CalibrateError(f"{out}: holds a run with a different `{key}`; pass --force to start over")
        if (out / "model").exists():
            raise CalibrateError(f"{out}: already holds a finished calibration (model/); pass --force to redo it")
    # the checks are done: from here on the command writes
    adopted = None
    for kind, sib in _leftovers(out):
        if kind == "old":
            if not out.exists():
                os.rename(sib, out)              # a killed --force run had moved the old run aside
            else:
                shutil.rmtree(sib, ignore_errors=True)
            continue
        reusable = (adopted is None and not force and not in_place and owner(sib) == COMMAND
                    and (sib / "sft" / "sft_meta.json").is_file() and (sib / "config.yaml").is_file())
        try:
            reusable = reusable and _same_run(_saved_config(sib), resolved) is None
        except UserError:
            reusable = False
        if reusable:
            adopted = sib
        else:
            shutil.rmtree(sib, ignore_errors=True)
    if in_place:
        work = out
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = out.parent / f".{out.name}.tmp-calibrate-{os.getpid()}"
        if adopted is not None:
            os.rename(adopted, work)
            print(f"[calibrate] resuming the run a killed process left in {adopted.name} (its SFT is complete)")
        else:
            work.mkdir()
    for stale in [work / ".probes", *work.glob(".model.tmp-*"), *work.glob(".sft.tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)      # half-written leftovers of a killed run
    if not (work / MARKER).is_file():
        mark_output(work, COMMAND)
    (work / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    return work


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


def run(cfg: CalibrateConfig, out: str | Path, force: bool = False, config_file: str | Path | None = None) -> dict:
    """The whole pipeline; returns the report (also written to ``out/report.json``).

    ``config_file``: the YAML the config came from (an input ``out`` may not overlap, like the
    model and the data files). Raises a ``UserError`` on bad input, before anything is written.
    """
    out = Path(os.path.expanduser(str(out))).resolve()
    inputs = [cfg.model, cfg.train_data, cfg.cal_data, config_file]
    tok, train, cal = preflight(cfg)
    work = _prepare_out(cfg, out, force, inputs)
    try:
        report = _run_in(cfg, work, out, tok, train, cal)
        if work != out:
            replace_dir(work, out)
    except BaseException:
        if work != out and not (work / "sft" / "sft_meta.json").is_file():
            shutil.rmtree(work, ignore_errors=True)   # nothing worth resuming; a finished SFT stays for a rerun
        raise
    return report


def _run_in(cfg: CalibrateConfig, work: Path, out: Path, tok, train: list[dict], cal: list[dict]) -> dict:
    """Steps 1-3 in directory ``work`` (renamed to ``out`` afterwards); the report names ``out``'s paths."""
    t0 = time.perf_counter()
    sft_meta = run_sft(cfg, work, train)
    t_sft = time.perf_counter() - t0

    t1 = time.perf_counter()
    evaluate = make_evaluator(cfg, work, tok, cal)
    s = cfg.search
    if s.method == "grid":
        result = search.grid_search(evaluate, s.grid_k, s.rho_min)
    else:
        result = search.binary_search(evaluate, s.rho_min, s.max_steps, s.early_stop)
    t_search = time.perf_counter() - t1
    search.write_table(result, work)
    search.plot(result, work / "rho_vs_sft_weight.png",
                title=f"{result.method} search, {cfg.estimator.method} estimator, {len(cal)} prompts")

    t2 = time.perf_counter()
    if (work / "model").exists():
        shutil.rmtree(work / "model")
    writer = merging.write_lora_merge if cfg.sft.method == "lora" else merging.write_full_merge
    writer(cfg.model, work / "sft", result.sft_weight, work / "model")
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
    (work / "report.md").write_text(_markdown(report))
    (work / "report.json").write_text(json.dumps(report, indent=2))    # last: the run is complete
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
