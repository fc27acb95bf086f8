"""Shared fixtures: tiny models and a tokenizer built on the spot (nothing is downloaded)."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sys

# test-only fault injection (tests/support/rlhf_faults.py) importable here, in subprocesses and in
# Ray workers (they inherit PYTHONPATH), like an installed module
SUPPORT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support")
if SUPPORT not in sys.path:
    sys.path.insert(0, SUPPORT)
if SUPPORT not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SUPPORT, os.environ.get("PYTHONPATH")) if p)

import pytest

from rlhf import tiny


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizer")
    tiny.train_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer):
    """A tiny Llama (head_dim 32), saved sharded with an index."""
    return tiny.make_tiny_model(tmp_path_factory.mktemp("llama") / "m", arch="llama", tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen2_tied(tmp_path_factory, tokenizer):
    """A tiny Qwen2 with tied input/output embeddings (no lm_head tensor on disk)."""
    return tiny.make_tiny_model(tmp_path_factory.mktemp("qwen2") / "m", arch="qwen2", tokenizer=tokenizer,
                                tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory, tiny_llama):
    """A base model and two fine-tuned relatives (same names, shapes, config): BAI merge inputs."""
    root = tmp_path_factory.mktemp("family")
    return {
        "base": tiny_llama,
        "sft_a": tiny.perturbed_copy(tiny_llama, root / "sft_a", seed=1),
        "sft_b": tiny.perturbed_copy(tiny_llama, root / "sft_b", seed=2),
    }


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray cluster for the module (loopback only, as ``rlhf train`` starts it); its address."""
    import ray

    from rlhf.workers.group import init_ray

    init_ray(None, num_cpus=8)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def dist_env(monkeypatch):
    """A one-rank torch.distributed environment on a free loopback port (an engine in this process)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
