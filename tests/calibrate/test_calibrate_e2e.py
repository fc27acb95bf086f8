"""End to end on CPU (issue 6, point 6): a tiny reasoner, empty-trace SFT, calibration.

1. A tiny Llama (hidden 64, 2 layers, "prefill" template) is trained with ``rlhf sft`` (full
   fine-tuning on DeepSpeed) to always reason on synthetic additions:
   ``<think>\\n3+4=7\\n</think>\\n\\n7``.
2. ``bai calibrate`` SFTs it with LoRA on empty-trace targets (reasoning collapses: rho(a=1) is
   low), then binary-searches the SFT weight with the logit estimator, cross-checked by the
   short-prefix estimator at every probe.

Stated agreement tolerance: |prefix rho - logit rho_mean| <= 0.1 at every probe. The prefix
rate here uses 50 prompts x 8 samples at temperature 1, an unbiased estimate of the logit
mean with standard error <= 0.5 / sqrt(400) = 0.025, so 0.1 is four standard errors.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from bai import cli as bai_cli
from rlhf.calibrate import data as data_mod
from rlhf.calibrate import estimators as est
from rlhf.calibrate import load_config, merging, run
from rlhf import cli as rlhf_cli
from rlhf import tiny

pytestmark = pytest.mark.slow
AGREEMENT_TOL = 0.1


def q(a: int, b: int) -> str:
    return f"What is {a} plus {b}?"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    tok = tiny.train_tokenizer(template="prefill")
    base = tiny.make_tiny_model(root / "base", tokenizer=tok, hidden_size=64, num_layers=2)
    pairs = [(a, b) for a in range(10) for b in range(10)]
    with open(root / "reason.jsonl", "w") as fh:
        for a, b in pairs:
            fh.write(json.dumps({"prompt": q(a, b), "response": f"<think>\n{a}+{b}={a + b}\n</think>\n\n{a + b}"}) + "\n")
    (root / "reason.yaml").write_text(yaml.safe_dump({
        "model": str(base), "data": str(root / "reason.jsonl"), "method": "full", "epochs": 10, "lr": 3e-3,
        "batch_size": 16, "micro_batch_size": 16, "warmup_ratio": 0.0}))
    assert rlhf_cli.main(["sft", str(root / "reason.yaml"), "--out", str(root / "reasoner")]) == 0
    with open(root / "train.jsonl", "w") as fh:
        fh.writelines(json.dumps({"input": q(a, b), "output": str(a + b)}) + "\n" for a, b in pairs[::2])
    with open(root / "cal.jsonl", "w") as fh:
        fh.writelines(json.dumps({"input": q(a, b)}) + "\n" for a, b in pairs[1::2])
    raw = {"model": str(root / "reasoner"), "train_data": str(root / "train.jsonl"),
           "cal_data": str(root / "cal.jsonl"),
           "sft": {"method": "lora", "epochs": 5, "lr": 1e-2, "batch_size": 16, "micro_batch_size": 16,
                   "warmup_ratio": 0.0, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
           "search": {"method": "binary", "rho_min": 0.9, "max_steps": 8},
           "estimator": {"method": "logit", "compare": True, "samples": 8, "prefix_tokens": 4}}
    (root / "calib.yaml").write_text(yaml.safe_dump(raw))
    assert bai_cli.main(["calibrate", str(root / "calib.yaml"), "--out", str(root / "run")]) == 0
    return {"root": root, "raw": raw, "run": root / "run",
            "report": json.loads((root / "run" / "report.json").read_text())}


def test_reasoner_always_reasons(world):
    cfg = load_config(world["raw"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model)
    model = merging.load_model(cfg.model).eval()
    _, cal = data_mod.load_records(cfg)
    prompts, paths = data_mod.calibration_prompts(tok, cal, cfg)
    r = est.logit_rate(model, prompts, paths, pad_id=tok.pad_token_id)
    assert r.rho_mean >= 0.98 and r.forward_calls == 4 and r.forward_rows == 50  # one pass per prompt


def test_calibration_finds_interior_alpha(world):
    rep = world["report"]
    probes = rep["probes"]
    assert probes[0]["sft_weight"] == 1.0 and probes[0]["rho"] < 0.5  # SFT collapsed reasoning
    assert 0.0 < rep["sft_weight"] < 1.0
    assert rep["rho_at_sft_weight"] >= 0.9
    assert len(probes) <= 8
    for p in probes:  # the two estimators agree within the stated tolerance
        assert abs(p["extra"]["prefix_rho"] - p["extra"]["rho_mean"]) <= AGREEMENT_TOL, p
    run_dir = world["run"]
    for name in ("probes.csv", "probes.jsonl", "rho_vs_sft_weight.png", "report.md", "config.yaml",
                 "sft/adapter_model.safetensors", "model/config.json"):
        assert (run_dir / name).exists(), name


def test_written_model_is_the_scaled_adapter(world):
    cfg = load_config(world["raw"])
    a = world["report"]["sft_weight"]
    ids = torch.tensor([list(range(5, 40))])
    peft_model = merging.load_lora(cfg.model, world["run"] / "sft", "cpu", "float32")
    with torch.no_grad():
        with merging.lora_at(peft_model, a):
            want = peft_model(input_ids=ids).logits
        full = merging.load_model(world["run"] / "model").eval()
        assert not any("lora" in k for k in full.state_dict())
        got = full(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4)


def test_resume_after_sft_with_another_search(world):
    run_dir = world["run"]
    with pytest.raises(ValueError, match="already holds a finished calibration"):
        run(load_config(world["raw"]), run_dir)
    shutil.rmtree(run_dir / "model")
    raw = {**world["raw"], "search": {"method": "grid", "grid_k": 4}, "estimator": {"method": "logit"}}
    rep = run(load_config(raw), run_dir)
    assert rep["sft"]["reused"] is True
    assert [p["sft_weight"] for p in rep["probes"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert rep["probes"][0]["rho"] >= 0.98 and rep["probes"][-1]["rho"] < 0.5
    changed = {**world["raw"], "sft": {**world["raw"]["sft"], "epochs": 1}}
    with pytest.raises(ValueError, match="different `sft`"):
        run(load_config(changed), run_dir)


def test_full_finetune_merges_linearly(world, tmp_path):
    raw = {**world["raw"], "sft": {"method": "full", "epochs": 1, "lr": 1e-3, "batch_size": 16,
                                   "micro_batch_size": 16, "warmup_ratio": 0.0},
           "search": {"method": "binary", "max_steps": 2}, "estimator": {"method": "logit"}}
    rep = run(load_config(raw), tmp_path / "full")
    a = rep["sft_weight"]
    orig = merging.load_model(raw["model"]).state_dict()
    sft = merging.load_model(tmp_path / "full" / "sft").state_dict()
    out = merging.load_model(tmp_path / "full" / "model").state_dict()
    for k in orig:
        assert torch.allclose(out[k], (1 - a) * orig[k] + a * sft[k], atol=1e-6), k
    merging.write_full_merge(raw["model"], tmp_path / "full" / "sft", 0.3, tmp_path / "m03")
    m03 = merging.load_model(tmp_path / "m03").state_dict()
    for k in orig:
        assert torch.allclose(m03[k], 0.7 * orig[k] + 0.3 * sft[k], atol=1e-6), k
    assert not any((tmp_path / "full" / ".probes").iterdir())  # probe checkpoints are deleted


def test_force_replaces_only_its_own_run(world, tmp_path, capsys):
    """--force onto an input, a directory holding inputs, a foreign directory: exit 2, nothing
    changed; onto an earlier `bai calibrate` run: replaced once the new run is complete."""
    from bairlhf.outputs import owner

    def tree(d):
        return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in sorted(d.rglob("*"))}

    root = world["root"]
    raw = {**world["raw"], "sft": {**world["raw"]["sft"], "epochs": 1}, "search": {"method": "grid", "grid_k": 1},
           "estimator": {"method": "logit"}}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    before_root, before_tmp = tree(root), tree(tmp_path)
    for out, expect in ((root / "reasoner", "is the input"), (root, "contains the input"),
                        (tmp_path, "contains the input"), (foreign, "was not written by `bai calibrate`")):
        capsys.readouterr()
        assert bai_cli.main(["calibrate", str(cfg), "--out", str(out), "--force"]) == 2, out
        err = capsys.readouterr().err.strip()
        assert expect in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert tree(root) == before_root and tree(tmp_path) == before_tmp
    out = tmp_path / "run"
    shutil.copytree(world["run"], out)
    (out / "stale.txt").write_text("from the earlier run")
    assert owner(out) == "bai calibrate"
    capsys.readouterr()
    assert bai_cli.main(["calibrate", str(cfg), "--out", str(out), "--force"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("bai calibrate: alpha*") and str(out) in last
    assert not (out / "stale.txt").exists() and owner(out) == "bai calibrate"
    assert [p["sft_weight"] for p in json.loads((out / "report.json").read_text())["probes"]] == [0.0, 1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "notes", "run"]
