"""Hugging Face Llama / Qwen2 checkpoints <-> megatron-core ``GPTModel`` (local layer spec) weights.

Megatron names on one rank (``L`` = the layer's index on its pipeline stage; the global HF layer is
``L + stage offset``), and how each is built from the HF tensors:

==============================================  ====================================================
``embedding.word_embeddings.weight``            ``model.embed_tokens.weight``, rows split over TP
``decoder.layers.L.input_layernorm.weight``     ``model.layers.N.input_layernorm.weight``
``decoder.layers.L.self_attention.linear_qkv``  ``q_proj``, ``k_proj``, ``v_proj`` (weight, and bias
                                                for Qwen2) grouped per KV head: for each KV head g,
                                                its ``heads/kv_heads`` query heads, then k_g, then
                                                v_g; the KV groups are split over TP
``decoder.layers.L.self_attention.linear_proj`` ``o_proj.weight``, columns split over TP
``decoder.layers.L.pre_mlp_layernorm.weight``   ``post_attention_layernorm.weight``
``decoder.layers.L.mlp.linear_fc1.weight``      ``[gate_proj shard r; up_proj shard r]`` on TP rank r
``decoder.layers.L.mlp.linear_fc2.weight``      ``down_proj.weight``, columns split over TP
``decoder.final_layernorm.weight``              ``model.norm.weight``
``output_layer.weight`` (policy)                ``lm_head.weight`` (``embed_tokens`` when tied), rows
                                                split over TP
``output_layer.weight`` (critic)                ``score.weight`` ``[1, hidden]``, replicated
==============================================  ====================================================

The critic mirrors the DeepSpeed critic (``AutoModelForSequenceClassification(num_labels=1)``, read
per token): same backbone names plus ``score.weight``, so either engine's checkpoints load in the
other. A checkpoint without ``score.weight`` (a causal LM) gets the head transformers would give
it under ``torch.manual_seed(seed)``: ``normal(0, initializer_range)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from bairlhf.errors import UserError


class MegatronEngineError(UserError):
    """A checkpoint or layout the megatron engine cannot use (the message names the key or tensor)."""


@dataclass(frozen=True)
class ArchSpec:
    """The shape facts of a Llama / Qwen2 checkpoint that the mapping needs (read from config.json)."""

    arch: str                # "llama" or "qwen2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    rms_eps: float
    rope_theta: float
    max_positions: int
    tied: bool               # tie_word_embeddings
    qkv_bias: bool           # Qwen2: q/k/v projections carry a bias
    initializer_range: float


def read_arch(model_dir: str | Path) -> ArchSpec:
    """The ``ArchSpec`` of an HF checkpoint directory; refuses architectures and options not mapped."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise MegatronEngineError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    cfg = json.loads(path.read_text())
    mtype = cfg.get("model_type")
    if mtype not in ("llama", "qwen2"):
        raise MegatronEngineError(f"{path}: model_type {mtype!r} is not supported by the megatron engine "
                                  "(supported: 'llama', 'qwen2')")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise MegatronEngineError(f"{path}: rope_type {rope_type!r} is not supported (only default RoPE)")
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    bias = mtype == "qwen2" or bool(cfg.get("attention_bias", False))
    if mtype == "llama" and cfg.get("mlp_bias", False):
        raise MegatronEngineError(f"{path}: mlp_bias: true is not supported")
    if cfg.get("use_sliding_window", False):
        raise MegatronEngineError(f"{path}: use_sliding_window: true is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise MegatronEngineError(f"{path}: hidden_act {cfg.get('hidden_act')!r} is not supported (only silu)")
    return ArchSpec(arch=mtype, vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
                    num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
                    num_kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=head_dim,
                    ffn_size=int(cfg["intermediate_size"]), rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                    rope_theta=float(theta), max_positions=int(cfg.get("max_position_embeddings", 4096)),
                    tied=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=bias,
                    initializer_range=float(cfg.get("initializer_range", 0.02)))


def check_layout(spec: ArchSpec, tp: int, pp: int, where: str = "megatron") -> None:
    """Refuse a TP / PP layout the checkpoint cannot be split into (names the setting)."""
    if spec.num_heads % tp or spec.num_kv_heads % tp:
        raise MegatronEngineError(f"{where}.tensor_parallel: {tp} must divide the attention heads "
                                  f"({spec.num_heads}) and KV heads ({spec.num_kv_heads})")
    if spec.ffn_size % tp or spec.vocab_size % tp:
        raise MegatronEngineError(f"{where}.tensor_parallel: {tp} must divide intermediate_size "
                                  f"({spec.ffn_size}) and vocab_size ({spec.vocab_size})")
    if spec.num_layers % pp:
        raise MegatronEngineError(f"{where}.pipeline_parallel: {pp} must divide num_hidden_layers "
                                  f"({spec.num_layers})")


class SafetensorsReader:
    """Lazy tensor access to a (possibly sharded) safetensors checkpoint, by HF name."""

    def __init__(self, model_dir: str | Path):
        from safetensors import safe_open

        d = Path(model_dir)
        index = d / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (d / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise MegatronEngineError(f"{d}: no model.safetensors(.index.json) (only safetensors checkpoints load)")
        self._handles = {}
        self._where: dict[str, str] = {}
        for f in files:
            h = safe_open(str(d / f), framework="pt")
            self._handles[f] = h
            for k in h.keys():
                self._where[k] = f
        self.model_dir = d

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise MegatronEngineError(f"{self.model_dir}: tensor {name!r} is missing from the checkpoint")
        return self._handles[self._where[name]].get_tensor(name)


def _hf_layer(n: int) -> str:
    return f"model.layers.{n}."


def hf_names(spec: ArchSpec, role: str) -> list[str]:
    """Every HF parameter name of the model, in the order ``export_weights`` yields them."""
    names = ["model.embed_tokens.weight"]
    for n in range(spec.num_layers):
        p = _hf_layer(n)
        names += [p + "input_layernorm.weight", p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                  p + "self_attn.v_proj.weight"]
        if spec.qkv_bias:
            names += [p + "self_attn.q_proj.bias", p + "self_attn.k_proj.bias", p + "self_attn.v_proj.bias"]
        names += [p + "self_attn.o_proj.weight", p + "post_attention_layernorm.weight", p + "mlp.gate_proj.weight",
                  p + "mlp.up_proj.weight", p + "mlp.down_proj.weight"]
    names.append("model.norm.weight")
    if role == "critic":
        names.append("score.weight")
    elif not spec.tied:
        names.append("lm_head.weight")
    return names


def hf_shape(spec: ArchSpec, name: str) -> tuple[int, ...]:
    """The full shape of an HF parameter."""
    h, hd = spec.hidden_size, spec.head_dim
    leaf = name.rsplit(".", 2)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (spec.vocab_size, h)
    if name == "score.weight":
        return (1, h)
    if name.endswith("norm.weight"):
        return (h,)
    kind = leaf[-2]
    rows = {"q_proj": spec.num_heads * hd, "k_proj": spec.num_kv_heads * hd, "v_proj": spec.num_kv_heads * hd}
    if kind in rows:
        return (rows[kind],) if leaf[-1] == "bias" else (rows[kind], h)
    return {"o_proj": (h, spec.num_heads * hd), "gate_proj": (spec.ffn_size, h), "up_proj": (spec.ffn_size, h),
            "down_proj": (h, spec.ffn_size)}[kind]


def tp_partition_dim(name: str, role: str) -> int | None:
    """The dimension megatron parameter ``name`` is split along over TP ranks (None: replicated)."""
    if name.endswith("layernorm.weight") or (role == "critic" and name == "output_layer.weight"):
        return None
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1
    return 0


# ----------------------------------------------------------------------------- HF -> megatron (one rank)

def _rows(t: torch.Tensor, tp: int, r: int) -> torch.Tensor:
    return t.chunk(tp, dim=0)[r]


def _cols(t: torch.Tensor, tp: int, r: int) -> torch.Tensor:
    return t.chunk(tp, dim=1)[r]


def group_qkv(spec: ArchSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Megatron's fused QKV layout (weight ``[rows, h]`` or bias ``[rows]``): per KV group, its query
    heads, then its key head, then its value head."""
    g, hd = spec.num_kv_heads, spec.head_dim
    qpg = spec.num_heads // g
    tail = q.shape[1:]
    qg = q.reshape(g, qpg * hd, *tail)
    return torch.cat([qg, k.reshape(g, hd, *tail), v.reshape(g, hd, *tail)], dim=1).reshape(-1, *tail)


def ungroup_qkv(spec: ArchSpec, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``group_qkv`` on the full (all TP ranks) fused tensor."""
    g, hd = spec.num_kv_heads, spec.head_dim
    qpg = spec.num_heads // g
    tail = qkv.shape[1:]
    x = qkv.reshape(g, (qpg + 2) * hd, *tail)
    q = x[:, :qpg * hd].reshape(-1, *tail)
    k = x[:, qpg * hd:(qpg + 1) * hd].reshape(-1, *tail)
    v = x[:, (qpg + 1) * hd:].reshape(-1, *tail)
    return q.contiguous(), k.contiguous(), v.contiguous()


def megatron_local_tensor(spec: ArchSpec, reader: SafetensorsReader, name: str, role: str, tp: int, tp_rank: int,
                          layer_offset: int, score_init) -> torch.Tensor:
    """The tensor for Megatron parameter ``name`` on TP rank ``tp_rank`` (of a stage whose first layer is
    the global layer ``layer_offset``), built from the HF checkpoint. ``score_init()`` gives the critic
    head when the checkpoint has none."""
    if name == "embedding.word_embeddings.weight":
        return _rows(reader.get("model.embed_tokens.weight"), tp, tp_rank)
    if name == "decoder.final_layernorm.weight":
        return reader.get("model.norm.weight")
    if name == "output_layer.weight":
        if role == "critic":
            return reader.get("score.weight") if reader.has("score.weight") else score_init()
        src = "model.embed_tokens.weight" if spec.tied or not reader.has("lm_head.weight") else "lm_head.weight"
        if not spec.tied and not reader.has("lm_head.weight"):
            raise MegatronEngineError(f"{reader.model_dir}: tensor 'lm_head.weight' is missing "
                                      "(tie_word_embeddings is false)")
        return _rows(reader.get(src), tp, tp_rank)
    parts = name.split(".")
    if parts[:2] != ["decoder", "layers"]:
        raise MegatronEngineError(f"megatron parameter {name!r} has no Hugging Face mapping")
    hf = _hf_layer(int(parts[2]) + layer_offset)
    rest = ".".join(parts[3:])
    if rest == "input_layernorm.weight":
        return reader.get(hf + "input_layernorm.weight")
    if rest == "pre_mlp_layernorm.weight":
        return reader.get(hf + "post_attention_layernorm.weight")
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[-1]
        q, k, v = (reader.get(f"{hf}self_attn.{p}_proj.{kind}") for p in "qkv")
        return _rows(group_qkv(spec, q, k, v), tp, tp_rank)
    if rest == "self_attention.linear_proj.weight":
        return _cols(reader.get(hf + "self_attn.o_proj.weight"), tp, tp_rank)
    if rest == "mlp.linear_fc1.weight":
        return torch.cat([_rows(reader.get(hf + "mlp.gate_proj.weight"), tp, tp_rank),
                          _rows(reader.get(hf + "mlp.up_proj.weight"), tp, tp_rank)], dim=0)
    if rest == "mlp.linear_fc2.weight":
        return _cols(reader.get(hf + "mlp.down_proj.weight"), tp, tp_rank)
    raise MegatronEngineError(f"megatron parameter {name!r} has no Hugging Face mapping")


# ----------------------------------------------------------------------------- megatron -> HF (full tensors)

def megatron_name(spec: ArchSpec, hf: str, role: str, layers_per_stage: int) -> tuple[int, str]:
    """(pipeline stage, Megatron parameter name) that holds HF parameter ``hf``."""
    last = spec.num_layers // layers_per_stage - 1
    if hf == "model.embed_tokens.weight":
        return 0, "embedding.word_embeddings.weight"
    if hf == "model.norm.weight":
        return last, "decoder.final_layernorm.weight"
    if hf in ("lm_head.weight", "score.weight"):
        return last, "output_layer.weight"
    parts = hf.split(".")
    n = int(parts[2])
    stage, local = divmod(n, layers_per_stage)
    pre = f"decoder.layers.{local}."
    rest = ".".join(parts[3:])
    table = {"input_layernorm.weight": "input_layernorm.weight",
             "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
             "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
             "mlp.gate_proj.weight": "mlp.linear_fc1.weight", "mlp.up_proj.weight": "mlp.linear_fc1.weight",
             "mlp.down_proj.weight": "mlp.linear_fc2.weight"}
    if rest in table:
        return stage, pre + table[rest]
    if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
        return stage, pre + "self_attention.linear_qkv." + rest.rsplit(".", 1)[-1]
    raise MegatronEngineError(f"Hugging Face parameter {hf!r} has no megatron mapping")


def hf_from_full(spec: ArchSpec, hf: str, gathered: list[torch.Tensor]) -> torch.Tensor:
    """The HF tensor ``hf`` from the TP shards of its Megatron parameter (``gathered[r]`` = rank r's)."""
    rest = hf.split(".", 3)[-1] if hf.startswith("model.layers.") else hf
    if len(gathered) == 1 and not rest.startswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                   "mlp.gate_proj", "mlp.up_proj")):
        return gathered[0]
    if rest.endswith("norm.weight") or hf == "score.weight":
        return gathered[0]
    if rest in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
        return torch.cat(gathered, dim=1)
    if rest.startswith(("mlp.gate_proj", "mlp.up_proj")):
        halves = [g.chunk(2, dim=0) for g in gathered]
        return torch.cat([h[0 if "gate" in rest else 1] for h in halves], dim=0)
    if rest.startswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")):
        q, k, v = ungroup_qkv(spec, torch.cat(gathered, dim=0))
        return {"q": q, "k": k, "v": v}[rest.split(".")[1][0]]
    return torch.cat(gathered, dim=0)  # embeddings / lm_head: vocab rows
