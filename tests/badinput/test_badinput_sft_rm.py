"""Bad input to `rlhf sft` and `rlhf rm`: config values out of range, bad enums, broken YAML,
malformed data files (file:line) and outputs they may not (re)place (issue 12 point 1: ``--force``
replaces only an earlier output of the same command, never an input). One line, exit 2,
nothing written. No model is loaded: every case fails before that (a stand-in checkpoint
directory holds only a ``config.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bairlhf.outputs import mark_output
from tests.badinput.harness import Case, run_case

SFT_OK = json.dumps({"prompt": "hi", "response": "hello"})
RM_OK = json.dumps({"prompt": "1 plus 1?", "chosen": "2", "rejected": "3"})


def setup_dir(config: dict | str, data: list[str] | None = None, extra=None, name: str = "c.yaml"):
    """Write a stand-in model, the data file (``d.jsonl``) and the config (keys may use ``{d}``)."""
    def setup(d: Path) -> None:
        (d / "model").mkdir()
        (d / "model" / "config.json").write_text("{}\n")
        (d / "d.jsonl").write_text("".join(line + "\n" for line in (data if data is not None else [SFT_OK])))
        if isinstance(config, str):
            (d / name).write_text(config.replace("{d}", str(d)))
        else:
            base = {"model": str(d / "model"), "data": str(d / "d.jsonl"), "out": str(d / "out")}
            merged = {**base, **{k: (v.replace("{d}", str(d)) if isinstance(v, str) else v)
                                 for k, v in config.items()}}
            (d / name).write_text(yaml.safe_dump({k: v for k, v in merged.items() if v is not None}))
        if extra is not None:
            extra(d)
    return setup


def out_dir(marker: str | None = None):
    def extra(d: Path) -> None:
        (d / "out").mkdir()
        (d / "out" / "keep.txt").write_text("someone's file\n")
        if marker:
            mark_output(d / "out", marker)
    return extra


SFT = ["rlhf", "sft", "{d}/c.yaml"]
RM = ["rlhf", "rm", "{d}/c.yaml"]


def rm_setup(config: dict | str, data: list[str] | None = None, extra=None):
    return setup_dir(config, data if data is not None else [RM_OK], extra)


CASES = [
    # rlhf sft: ranges and enums
    Case("sft-epochs-0", SFT, "sft.epochs: must be >= 1, got 0", setup_dir({"epochs": 0})),
    Case("sft-lr-negative", SFT, "sft.lr: must be in (0, 1]", setup_dir({"lr": -1e-5})),
    Case("sft-lr-nan", SFT, "sft.lr: must be a finite number", setup_dir("model: m\ndata: d\nout: o\nlr: .nan\n")),
    Case("sft-method", SFT, "sft.method: must be one of 'lora', 'full'", setup_dir({"method": "qlora"})),
    Case("sft-dtype", SFT, "sft.dtype", setup_dir({"dtype": "float16"})),
    Case("sft-lora-dropout", SFT, "sft.lora.dropout", setup_dir({"lora": {"dropout": 1.5}})),
    Case("sft-lora-r-0", SFT, "sft.lora.r", setup_dir({"lora": {"r": 0}})),
    Case("sft-warmup-ratio-1", SFT, "sft.warmup_ratio", setup_dir({"warmup_ratio": 1.0})),
    Case("sft-zero-stage-5", SFT, "sft.zero_stage", setup_dir({"zero_stage": 5})),
    Case("sft-max-len-1", SFT, "sft.max_len", setup_dir({"max_len": 1})),
    Case("sft-unknown-key", SFT, "sft: unknown key(s) ['lerning_rate']", setup_dir({"lerning_rate": 1})),
    Case("sft-batch-not-multiple", SFT, "sft.batch_size: 10 is not a multiple",
         setup_dir({"batch_size": 10, "micro_batch_size": 4})),
    # rlhf sft: YAML and paths
    Case("sft-yaml-syntax", SFT, "c.yaml:3:1: YAML syntax error", setup_dir("model: m\nlr: [1\n")),
    Case("sft-yaml-tab", SFT, "tabs", setup_dir("lora:\n\tr: 4\n")),
    Case("sft-yaml-missing", ["rlhf", "sft", "{d}/none.yaml"], "does not exist"),
    Case("sft-model-not-checkpoint", SFT, "sft.model", setup_dir({"model": "{d}"})),
    Case("sft-data-missing", SFT, "sft.data: file not found", setup_dir({"data": "{d}/none.jsonl"})),
    # rlhf sft: data file (file:line)
    Case("sft-data-bad-json", SFT, "d.jsonl:2: not valid JSON", setup_dir({}, [SFT_OK, "{nope"])),
    Case("sft-data-line-number", SFT, "d.jsonl:1: expected a JSON object", setup_dir({}, ["3"])),
    Case("sft-data-missing-response", SFT, "d.jsonl:2: record has no field 'response'",
         setup_dir({}, [SFT_OK, json.dumps({"prompt": "x"})])),
    Case("sft-data-custom-field", SFT, "d.jsonl:1: record has no field 'answer'",
         setup_dir({"response_field": "answer"})),
    Case("sft-data-empty", SFT, "d.jsonl: no records", setup_dir({}, [])),
    # rlhf sft: outputs
    Case("sft-out-exists", SFT, "out: already exists; pass --force", setup_dir({}, extra=out_dir())),
    Case("sft-force-not-ours", SFT + ["--force"], "was not written by `rlhf sft`", setup_dir({}, extra=out_dir())),
    Case("sft-force-other-command", SFT + ["--force"], "was written by `rlhf rm`",
         setup_dir({}, extra=out_dir("rlhf rm"))),
    Case("sft-out-is-model", SFT + ["--force"], "the output directory is the input", setup_dir({"out": "{d}/model"})),
    Case("sft-out-inside-model", SFT, "lies inside the input", setup_dir({"out": "{d}/model/sft"})),
    Case("sft-out-contains-data", SFT + ["--out", "{d}", "--force"], "contains the input", setup_dir({})),
    # rlhf rm: ranges
    Case("rm-lr-0", RM, "lr: must be in (0, 1]", rm_setup({"lr": 0})),
    Case("rm-lr-nan", RM, "lr: must be a finite number",
         rm_setup("model: {d}/model\ndata: {d}/d.jsonl\nout: {d}/out\nlr: .nan\n")),
    Case("rm-epochs-0", RM, "epochs: must be >= 1", rm_setup({"epochs": 0})),
    Case("rm-max-length-1", RM, "max_length", rm_setup({"max_length": 1})),
    Case("rm-zero-stage-4", RM, "zero_stage", rm_setup({"zero_stage": 4})),
    Case("rm-grad-clip-negative", RM, "grad_clip", rm_setup({"grad_clip": -1})),
    Case("rm-unknown-key", RM, "unknown key 'lerning_rate'", rm_setup({"lerning_rate": 1})),
    Case("rm-missing-data", RM, "missing required key 'data'", rm_setup({"data": None})),
    # rlhf rm: YAML, overrides, paths
    Case("rm-yaml-tab", RM, "tabs", rm_setup("model: m\nepochs:\n\t2\n")),
    Case("rm-yaml-syntax", RM, "c.yaml:", rm_setup("model: [m\n")),
    Case("rm-override-bad-value", RM + ["lr=[1"], "lr: cannot parse override value", rm_setup({})),
    Case("rm-override-not-key-value", RM + ["oops"], "override 'oops' is not key=value", rm_setup({})),
    Case("rm-eval-missing", RM, "eval_data: file not found", rm_setup({"eval_data": "{d}/none.jsonl"})),
    Case("rm-model-missing", RM, "model: directory not found", rm_setup({"model": "{d}/none"})),
    # rlhf rm: data (file:line)
    Case("rm-data-bad-json", RM, "d.jsonl:2: not valid JSON", rm_setup({}, [RM_OK, "{"])),
    Case("rm-data-line-list", RM, "d.jsonl:1: expected a JSON object", rm_setup({}, ["[1, 2]"])),
    Case("rm-data-missing-rejected", RM, "d.jsonl:3: key 'rejected' missing",
         rm_setup({}, [RM_OK, RM_OK, json.dumps({"prompt": "p", "chosen": "c"})])),
    Case("rm-data-not-string", RM, "d.jsonl:1: key 'chosen'",
         rm_setup({}, [json.dumps({"prompt": "p", "chosen": 1, "rejected": "r"})])),
    Case("rm-data-empty", RM, "d.jsonl: no pairs", rm_setup({}, [""])),
    # rlhf rm: outputs
    Case("rm-out-exists", RM, "already exists; pass --force", rm_setup({}, extra=out_dir())),
    Case("rm-force-not-ours", RM + ["--force"], "was not written by `rlhf rm`", rm_setup({}, extra=out_dir())),
    Case("rm-force-other-command", RM + ["--force"], "was written by `rlhf sft`",
         rm_setup({}, extra=out_dir("rlhf sft"))),
    Case("rm-out-is-model", RM + ["--force"], "the output directory is the input", rm_setup({"out": "{d}/model"})),
    Case("rm-out-contains-data", RM + ["out={d}", "--force"], "contains the input", rm_setup({})),
]

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_sft_rm_bad_input(case, tmp_path, capsys, monkeypatch):
    run_case(case, tmp_path, capsys, monkeypatch)
