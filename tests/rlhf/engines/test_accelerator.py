"""rlhf.engines.accelerator: every combination of the facts (CUDA or not, DS_ACCELERATOR set or not)
gives the documented accelerator, process-group backend, device and dtype; MFU arithmetic. Pure
functions: no torch device, no DeepSpeed, runs anywhere."""

from __future__ import annotations

import math

import pytest

from bairlhf.errors import UserError
from rlhf.engines import accelerator as acc

# (cuda_available, env, expected accelerator or error substring)
DS_CASES = [
    (True, {}, "cuda"),
    (False, {}, "cpu"),
    (True, {"DS_ACCELERATOR": ""}, "cuda"),          # empty: not a choice
    (False, {"DS_ACCELERATOR": "  "}, "cpu"),
    (True, {"DS_ACCELERATOR": "cpu"}, "cpu"),        # explicit wins over the hardware
    (False, {"DS_ACCELERATOR": "cpu"}, "cpu"),
    (True, {"DS_ACCELERATOR": "cuda"}, "cuda"),
    (False, {"DS_ACCELERATOR": "cuda"}, "error:sees no CUDA device"),
    (True, {"DS_ACCELERATOR": "npu"}, "npu"),        # another DeepSpeed accelerator passes through
    (True, {"DS_ACCELERATOR": "gpu"}, "error:'gpu' is not one of"),
    (False, {"DS_ACCELERATOR": "CUDA"}, "error:'CUDA' is not one of"),
    (True, {"OTHER": "x"}, "cuda"),
]


@pytest.mark.parametrize("cuda,env,expect", DS_CASES, ids=[f"{c}-{e}-{x}" for c, e, x in DS_CASES])
def test_ds_accelerator(cuda, env, expect):
    if expect.startswith("error:"):
        with pytest.raises(acc.AcceleratorError, match=expect[6:]) as ei:
            acc.ds_accelerator(cuda, env)
        assert isinstance(ei.value, UserError) and "DS_ACCELERATOR" in str(ei.value)
    else:
        assert acc.ds_accelerator(cuda, env) == expect
        if expect in acc.DIST_BACKENDS:
            assert acc.dist_backend(expect) == {"cuda": "nccl", "cpu": "gloo"}[expect]


def test_ds_accelerator_no_env_mapping():
    assert acc.ds_accelerator(True) == "cuda" and acc.ds_accelerator(False, None) == "cpu"


BASE = {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("cuda", [True, False])
@pytest.mark.parametrize("env", [{}, {"DS_ACCELERATOR": "cpu"}, {"DS_ACCELERATOR": "cuda"},
                                 {"TOKENIZERS_PARALLELISM": "true"}])
def test_worker_env(cuda, env):
    if env.get("DS_ACCELERATOR") == "cuda" and not cuda:
        out = acc.worker_env(BASE, cuda, env)  # already set: left to the environment, never re-decided
        assert "DS_ACCELERATOR" not in out
        return
    out = acc.worker_env(BASE, cuda, env)
    for k in env:
        assert k not in out  # keys the environment has are the environment's
    if "DS_ACCELERATOR" not in env:
        assert out["DS_ACCELERATOR"] == ("cuda" if cuda else "cpu")  # not the base's hard-coded cpu
    if "TOKENIZERS_PARALLELISM" not in env:
        assert out["TOKENIZERS_PARALLELISM"] == "false"
    assert out.get("HF_HUB_OFFLINE") == "1"


def test_worker_env_does_not_modify_inputs():
    base, env = dict(BASE), {"X": "1"}
    acc.worker_env(base, True, env)
    assert base == BASE and env == {"X": "1"}


@pytest.mark.parametrize("name,expect", [("cuda", "nccl"), ("cpu", "gloo"), ("npu", "error"), ("", "error")])
def test_dist_backend(name, expect):
    if expect == "error":
        with pytest.raises(acc.AcceleratorError, match="accelerator"):
            acc.dist_backend(name)
    else:
        assert acc.dist_backend(name) == expect


@pytest.mark.parametrize("cuda,shares,expect", [(True, False, "nccl"), (True, True, "gloo"),
                                                (False, False, "gloo"), (False, True, "gloo")])
def test_weight_sync_backend(cuda, shares, expect):
    assert acc.weight_sync_backend(cuda, shares) == expect


@pytest.mark.parametrize("cuda,index,expect", [(True, 0, "cuda:0"), (True, 3, "cuda:3"), (False, 0, "cpu"),
                                               (False, 5, "cpu")])
def test_model_device(cuda, index, expect):
    assert acc.model_device(cuda, index) == expect


def test_model_device_negative_index():
    with pytest.raises(acc.AcceleratorError, match="device index"):
        acc.model_device(True, -1)


@pytest.mark.parametrize("bf16,cuda,supported,expect", [
    (False, False, False, "float32"), (False, True, True, "float32"), (False, True, False, "float32"),
    (True, False, False, "bfloat16"),  # CPU bf16 is allowed (DeepSpeed's CPU bf16 path)
    (True, True, True, "bfloat16"),
    (True, True, False, "error"),
])
def test_weights_dtype(bf16, cuda, supported, expect):
    if expect == "error":
        with pytest.raises(acc.AcceleratorError, match="deepspeed.bf16"):
            acc.weights_dtype(bf16, cuda, supported)
    else:
        assert acc.weights_dtype(bf16, cuda, supported) == expect
    assert acc.compute_dtype() == "float32"


@pytest.mark.parametrize("name,expect", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0),
    ("NVIDIA B200", 2250.0), ("Tesla T4", None), ("", None),
])
def test_peak_tflops_table(name, expect):
    assert acc.peak_tflops(name) == expect


@pytest.mark.parametrize("override", [500.0, 1.5])
def test_peak_override_wins(override):
    assert acc.peak_tflops("NVIDIA H100 80GB HBM3", override) == override
    assert acc.peak_tflops("unknown", override) == override


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_peak_override_rejected(bad):
    with pytest.raises(acc.AcceleratorError, match="peak"):
        acc.peak_tflops("NVIDIA H100", bad)


def test_train_flops_and_mfu_arithmetic():
    # 6 N + 12 L H S
    assert acc.train_flops_per_token(1000, 2, 8, 16) == 6 * 1000 + 12 * 2 * 8 * 16
    f = acc.train_flops_per_token(134_515_008, 30, 576, 512)
    # 10k tokens/s on one 989 TFLOP/s GPU
    m = acc.mfu(10_000, f, 989.0)
    assert math.isclose(m, 10_000 * f / 989e12)
    assert math.isclose(acc.mfu(10_000, f, 989.0, num_gpus=2), m / 2)
    assert acc.mfu(10_000, f, None) is None
    # a 1e12 FLOP/s achieved on a 100 TFLOP/s GPU is 1%
    assert math.isclose(acc.mfu(1e6, 1e6, 100.0), 0.01)


@pytest.mark.parametrize("kw", [dict(n_params=-1), dict(n_layers=-1), dict(hidden=-1), dict(seq_len=-1)])
def test_train_flops_rejects_negative(kw):
    args = dict(n_params=1, n_layers=1, hidden=1, seq_len=1) | kw
    with pytest.raises(acc.AcceleratorError, match=next(iter(kw))):
        acc.train_flops_per_token(**args)


@pytest.mark.parametrize("gpus,peak", [(0, 989.0), (1, -1.0)])
def test_mfu_rejects(gpus, peak):
    with pytest.raises(acc.AcceleratorError, match="mfu"):
        acc.mfu(1.0, 1.0, peak, num_gpus=gpus)


def test_detect_on_this_machine_matches_torch():
    import torch

    f = acc.detect()
    assert f.cuda_available == torch.cuda.is_available()
    assert f.torch_cuda == torch.version.cuda
    if not f.cuda_available:
        assert (f.device_count, f.device_name, f.bf16_supported) == (0, "", False)
        assert acc.ds_accelerator(f.cuda_available, {}) == "cpu"


def test_module_imports_no_torch_at_import():
    import subprocess
    import sys

    code = "import sys, rlhf.engines.accelerator; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
