"""Config validation, Table 2 presets, appendix-B prompts and bad-input errors of `bai calibrate`."""

from __future__ import annotations

import json

import pytest
import yaml

from bai import cli
from rlhf.calibrate import TABLE2_PRESETS, load_config
from rlhf.calibrate.config import PROMPT_TEMPLATES
from rlhf.calibrate.pipeline import preflight


@pytest.fixture
def base(tmp_path, tiny_llama):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"input": f"q{i}", "output": f"a{i}"}) + "\n"
                                                  for i in range(3)))
    (tmp_path / "cal.jsonl").write_text(json.dumps({"input": "q"}) + "\n")
    return {"model": str(tiny_llama), "train_data": str(tmp_path / "train.jsonl"),
            "cal_data": str(tmp_path / "cal.jsonl")}


def test_table2_presets(base):
    assert len(TABLE2_PRESETS) == 7
    cfg = load_config({**base, "sft": {"preset": "rust-apriel-15b-lora"}})
    assert (cfg.sft.method, cfg.sft.epochs, cfg.sft.lr, cfg.sft.batch_size) == ("lora", 5, 1e-4, 64)
    cfg = load_config({**base, "sft": {"preset": "rust-openthinker-7b-full", "epochs": 2}})
    assert (cfg.sft.method, cfg.sft.epochs) == ("full", 2)
    with pytest.raises(ValueError, match="sft.preset: must be one of"):
        load_config({**base, "sft": {"preset": "nope"}})


def test_prompt_template_presets(base):
    cfg = load_config({**base, "prompt_template": "rust"})
    assert cfg.prompt_template == PROMPT_TEMPLATES["rust"] and cfg.prompt_template.endswith("Instruction:\n{input}")
    with pytest.raises(ValueError, match="prompt_template: must contain"):
        load_config({**base, "prompt_template": "no placeholder"})


@pytest.mark.parametrize("rho_min", [0, -0.1, 1.5])
def test_rho_min_outside_unit_interval(base, rho_min):
    with pytest.raises(ValueError, match=r"config.search.rho_min: must be in \(0, 1\]"):
        load_config({**base, "search": {"rho_min": rho_min}})


def test_unknown_and_missing_keys(base, tmp_path):
    with pytest.raises(ValueError, match="config.search.alpha: unknown key"):
        load_config({**base, "search": {"alpha": 0.5}})
    with pytest.raises(ValueError, match="config.cal_data: file not found"):
        load_config({**base, "cal_data": str(tmp_path / "missing.jsonl")})


def test_data_without_the_configured_field(base, tmp_path):
    cfg = load_config({**base, "output_field": "answer"})
    with pytest.raises(ValueError, match=r"train.jsonl:1: record has no field 'answer'"):
        preflight(cfg)


def test_tokenizer_without_reasoning_marker(base):
    cfg = load_config({**base, "reasoning": {"start": "<reasoning>", "empty_trace": "<reasoning></think>"}})
    with pytest.raises(ValueError, match="reasoning.start: tokenizer has no reasoning marker '<reasoning>'"):
        preflight(cfg)


def test_prefix_window_shorter_than_empty_path(base):
    cfg = load_config({**base, "estimator": {"method": "prefix", "prefix_tokens": 1}})
    with pytest.raises(ValueError, match="estimator.prefix_tokens: 1 is shorter than the empty path"):
        preflight(cfg)


def test_cli_reports_one_clear_error(base, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**base, "search": {"rho_min": 2}}))
    assert cli.main(["calibrate", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "search.rho_min" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_shipped_configs_validate(base):
    from pathlib import Path

    files = sorted(Path(__file__).resolve().parents[2].joinpath("configs", "calibrate").glob("*.yaml"))
    assert len(files) == 8
    presets = set()
    for f in files:
        raw = {**yaml.safe_load(f.read_text()), **base}
        cfg = load_config(raw, str(f))
        presets.add(cfg.sft.preset)
        assert "{input}" in cfg.prompt_template
    assert presets - {None} == set(TABLE2_PRESETS)


def test_every_numeric_field_has_a_documented_range():
    import importlib.util
    from pathlib import Path

    from bairlhf.typed_config import field_ranges

    from rlhf.calibrate import CalibrateConfig

    spec = importlib.util.spec_from_file_location(
        "bai_config_tests", Path(__file__).resolve().parents[1] / "bai" / "test_bai_config.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    ranges = field_ranges(CalibrateConfig)
    keys = helpers.numeric_fields(CalibrateConfig)
    assert {"search.rho_min", "sft.lr", "sft.lora.dropout", "estimator.threshold", "seed"} <= set(keys)
    assert [k for k in keys if k not in ranges] == []
    assert ranges["search.rho_min"] == "(0, 1]"
