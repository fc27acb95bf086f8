"""The HF <-> megatron mapping and the engine's input checks (no megatron process started here)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from bairlhf.errors import UserError
from rlhf.engines.megatron import MegatronEngine, MegatronEngineError
from rlhf.engines.megatron.hf_mapping import (ArchSpec, SafetensorsReader, check_layout, group_qkv, hf_names,
                                              hf_shape, megatron_name, read_arch, ungroup_qkv)


def _spec(heads=4, kv=2, hd=8, layers=2, tied=False, bias=True) -> ArchSpec:
    return ArchSpec(arch="qwen2", vocab_size=64, hidden_size=heads * hd, num_layers=layers, num_heads=heads,
                    num_kv_heads=kv, head_dim=hd, ffn_size=48, rms_eps=1e-6, rope_theta=1e4, max_positions=128,
                    tied=tied, qkv_bias=bias, initializer_range=0.02)


@pytest.mark.parametrize("heads,kv", [(4, 2), (4, 4), (4, 1)])
def test_qkv_grouping_round_trip_and_layout(heads, kv):
    s = _spec(heads, kv)
    h, hd = s.hidden_size, s.head_dim
    q, k, v = torch.randn(heads * hd, h), torch.randn(kv * hd, h), torch.randn(kv * hd, h)
    fused = group_qkv(s, q, k, v)
    qpg = heads // kv
    # group 0: its query heads, then key head 0, then value head 0
    assert torch.equal(fused[:qpg * hd], q[:qpg * hd])
    assert torch.equal(fused[qpg * hd:(qpg + 1) * hd], k[:hd])
    assert torch.equal(fused[(qpg + 1) * hd:(qpg + 2) * hd], v[:hd])
    assert all(torch.equal(a, b) for a, b in zip(ungroup_qkv(s, fused), (q, k, v)))
    qb, kb, vb = torch.randn(heads * hd), torch.randn(kv * hd), torch.randn(kv * hd)
    assert all(torch.equal(a, b) for a, b in zip(ungroup_qkv(s, group_qkv(s, qb, kb, vb)), (qb, kb, vb)))


def test_names_shapes_and_stages():
    s = _spec(tied=True)
    pol, cri = hf_names(s, "policy"), hf_names(s, "critic")
    assert "lm_head.weight" not in pol and cri[-1] == "score.weight"
    assert hf_shape(s, "model.layers.1.self_attn.k_proj.weight") == (16, 32)
    assert hf_shape(s, "model.layers.0.self_attn.q_proj.bias") == (32,)
    assert hf_shape(s, "model.layers.0.mlp.down_proj.weight") == (32, 48)
    assert megatron_name(s, "model.layers.1.mlp.up_proj.weight", "policy", 1) == (1, "decoder.layers.0.mlp.linear_fc1.weight")
    assert megatron_name(s, "score.weight", "critic", 1) == (1, "output_layer.weight")
    assert megatron_name(s, "model.embed_tokens.weight", "policy", 1)[0] == 0


def test_read_arch_of_the_tiny_models(tiny_llama, tiny_qwen2_tied):
    a, b = read_arch(tiny_llama), read_arch(tiny_qwen2_tied)
    assert (a.arch, a.qkv_bias, a.tied, a.head_dim) == ("llama", False, False, 32)
    assert (b.arch, b.qkv_bias, b.tied) == ("qwen2", True, True)


BAD_CONFIGS = [  # (id, config.json edit, expected words in the message)
    ("model_type", {"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ("rope_scaling", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type 'llama3'"),
    ("hidden_act", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ("mlp_bias", {"mlp_bias": True}, "mlp_bias"),
]


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=lambda c: c[0])
def test_read_arch_refuses(case, tiny_llama, tmp_path):
    _, edit, expect = case
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters", None) if "rope_scaling" in edit else None
    cfg.update(edit)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MegatronEngineError, match=expect.replace("(", r"\(")):
        read_arch(d)


BAD_LAYOUTS = [  # (id, tp, pp, expected)
    ("tp_heads", 3, 1, "megatron.tensor_parallel: 3 must divide the attention heads"),
    ("tp_kv_heads", 4, 1, "KV heads (2)"),
    ("pp_layers", 1, 3, "megatron.pipeline_parallel: 3 must divide num_hidden_layers (2)"),
]


@pytest.mark.parametrize("case", BAD_LAYOUTS, ids=lambda c: c[0])
def test_check_layout_refuses(case):
    _, tp, pp, expect = case
    with pytest.raises(MegatronEngineError) as e:
        check_layout(_spec(4, 2), tp, pp)
    assert expect in str(e.value)


def test_engine_input_errors_come_before_any_distributed_work(tiny_llama, tmp_path):
    import torch.distributed as dist

    assert issubclass(MegatronEngineError, UserError)
    with pytest.raises(MegatronEngineError, match="role: 'actor'"):
        MegatronEngine(tiny_llama, "actor", lr=1e-3)
    with pytest.raises(MegatronEngineError, match="megatron.tensor_parallel: 3"):
        MegatronEngine(tiny_llama, "policy", type("S", (), {"tensor_parallel": 3})(), lr=1e-3)
    with pytest.raises(MegatronEngineError, match="no config.json"):
        MegatronEngine(tmp_path, "policy", lr=1e-3)
    assert not dist.is_initialized()


def test_reader_names_missing_tensors_and_refuses_pickles(tiny_llama, tmp_path):
    r = SafetensorsReader(tiny_llama)
    with pytest.raises(MegatronEngineError, match="'score.weight' is missing"):
        r.get("score.weight")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(MegatronEngineError, match="only safetensors"):
        SafetensorsReader(tmp_path)


def test_importing_the_engine_patches_nothing():
    code = ("import sys, torch; import rlhf.engines.megatron as m; from rlhf.engines.megatron import cuda_shim; "
            "assert 'megatron' not in sys.modules and 'megatron.core' not in sys.modules; "
            "assert not cuda_shim.applied() and torch.Tensor.cuda is not cuda_shim._tensor_cuda; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
