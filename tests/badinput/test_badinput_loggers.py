"""Bad input to `rlhf train` in the issue-15 keys: ``trainer.loggers`` (jsonl required, each once,
known names, wandb installed) and ``metrics.preflight_long_tokens``. One line naming the key,
exit 2, before any work (no run directory, no tiny model, no config.yaml)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.badinput.harness import Case, run_case

T = ["rlhf", "train"]


def write(name: str, text: str):
    """A setup that writes ``text`` to ``name`` in the case's directory."""
    def setup(d: Path) -> None:
        (d / name).write_text(text)
    return setup


CASES = [
    Case("loggers-without-jsonl", T + ["trainer.loggers=[tensorboard]"], "trainer.loggers: must list jsonl"),
    Case("loggers-empty", T + ["trainer.loggers=[]"], "trainer.loggers: must list jsonl"),
    Case("loggers-twice", T + ["trainer.loggers=[jsonl,tensorboard,jsonl]"], "trainer.loggers: must list jsonl"
         " (metrics.jsonl is what resume, the detectors and rlhf report read), each logger once"),
    Case("loggers-unknown", T + ["trainer.loggers=[jsonl,mlflow]"], "trainer.loggers[1]: must be one of"),
    Case("loggers-not-a-list", T + ["trainer.loggers=jsonl"], "trainer.loggers: expected a list"),
    Case("loggers-unknown-in-yaml", T + ["{d}/c.yaml"], "trainer.loggers[2]: must be one of",
         write("c.yaml", "trainer:\n  loggers: [jsonl, tensorboard, neptune]\n")),
    Case("preflight-long-tokens-negative", T + ["metrics.preflight_long_tokens=-1"],
         "metrics.preflight_long_tokens: must be >= 0"),
    Case("preflight-long-tokens-float", T + ["metrics.preflight_long_tokens=2.5"], "metrics.preflight_long_tokens"),
    Case("preflight-long-tokens-text", T + ["metrics.preflight_long_tokens=median"], "metrics.preflight_long_tokens"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_loggers_bad_input(case, tmp_path, capsys, monkeypatch):
    run_case(case, tmp_path, capsys, monkeypatch)


def test_wandb_logger_without_wandb_installed(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    run_case(Case("wandb-missing", T + ["trainer.loggers=[jsonl,wandb]"], "trainer.loggers: wandb is not installed"),
             tmp_path, capsys, monkeypatch)
