"""The real pretrained model fixture (SmolLM2-135M-Instruct, bf16), built once by
``scripts/real_model.py`` and cached in ``$BAI_RLHF_CACHE`` (default ``~/.cache/bai-rlhf``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _builder():
    spec = importlib.util.spec_from_file_location("real_model_script", ROOT / "scripts" / "real_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def real_model() -> Path:
    return _builder().build()
