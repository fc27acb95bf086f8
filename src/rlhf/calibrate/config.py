"""Typed configuration of ``bai calibrate`` and the paper's presets (seed 000, Table 2, appendix B).

Convention: the merge weight searched here is the weight of the **SFT model**,
``M_a = (1 - a) * M + a * M_sft`` (the paper's alpha), named ``sft_weight`` everywhere. (In
``bai merge`` alpha is the base-model weight; the two papers use opposite conventions.)

Every numeric field's valid range is part of its type (``Annotated[..., Range(...)]``) and every
enum is a ``Literal``; ``bairlhf.typed_config.build`` checks them at load (``field_ranges(
CalibrateConfig)`` lists them). A bad value raises ``CalibrateError`` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from bairlhf.errors import UserError
from bairlhf.typed_config import Range, build, coerce
from rlhf.sft import LORA_TARGETS, LoraSettings  # noqa: F401  (the one LoRA dataclass; calibrate's sft.lora)


class CalibrateError(UserError):
    """Bad ``bai calibrate`` input; the message names the key, or the file and line."""


Preset = Literal["rust-openthinker-7b-lora", "rust-openthinker-7b-full", "rust-apriel-15b-lora",
                 "rust-olmo3-7b-lora", "summarization-openthinker-7b-lora", "summarization-apriel-15b-lora",
                 "summarization-olmo3-7b-lora"]
"""The names of ``TABLE2_PRESETS``."""

# Table 2 of the paper: SFT hyperparameters per (dataset, model, method); batch size is the
# effective training batch size. The LoRA rank is not given in the paper (our default r=16).
TABLE2_PRESETS: dict[str, dict] = {
    "rust-openthinker-7b-lora": {"method": "lora", "epochs": 5, "lr": 5e-5, "batch_size": 16},
    "rust-openthinker-7b-full": {"method": "full", "epochs": 5, "lr": 5e-5, "batch_size": 16},
    "rust-apriel-15b-lora": {"method": "lora", "epochs": 5, "lr": 1e-4, "batch_size": 64},
    "rust-olmo3-7b-lora": {"method": "lora", "epochs": 3, "lr": 5e-5, "batch_size": 16},
    "summarization-openthinker-7b-lora": {"method": "lora", "epochs": 1, "lr": 5e-5, "batch_size": 16},
    "summarization-apriel-15b-lora": {"method": "lora", "epochs": 1, "lr": 1e-4, "batch_size": 64},
    "summarization-olmo3-7b-lora": {"method": "lora", "epochs": 1, "lr": 1e-5, "batch_size": 16},
}

# Appendix B task prompts (Figures 6, 7, 8); ``{input}`` is replaced by the record's input field.
PROMPT_TEMPLATES: dict[str, str] = {
    "rust": (
        "You are a helpful coding assistant producing high-quality Rust code.\n"
        "Strictly follow the instruction below to complete the function specified in the\n"
        "instruction.\n"
        "Your response should include all dependencies, headers and function declaration\n"
        "to be directly usable (even for the ones seen in the given part).\n"
        "You should NOT call or test the function in your response.\n"
        "Output your complete implementation in a single code block wrapped in triple\n"
        "backticks with `rust` specified, like this:\n"
        "```rust\n"
        "// your function here\n"
        "```\n"
        "Instruction:\n"
        "{input}"
    ),
    "math500": "{input}\nPlease reason step by step, and put your final answer within \\boxed{ }.",
    "summarization": (
        "You are an expert in writing summarization.\n"
        "Your task is to read the following Article and write a summary about it.\n"
        "\n"
        "Output your complete summary after the <SUMMARY> tag, like this:\n"
        "<SUMMARY>\n"
        "// your summary here\n"
        "\n"
        "Article:\n"
        "{input}"
    ),
}


@dataclass
class ReasoningSettings:
    """How the model marks its reasoning trace."""

    start: str = "<think>"
    """Reasoning-start marker; must be a single token of the tokenizer."""
    end: str = "</think>"
    """End-of-reasoning marker; must be a single token of the tokenizer."""
    empty_trace: str = "<think>\n\n</think>\n\n"
    """The empty trace epsilon as the chat template renders it (Qwen3's ``enable_thinking=False``
    form by default); SFT targets are ``empty_trace + output``, tokenized after the prefill."""


@dataclass
class SFTSettings:
    """SFT step (``rlhf.sft``); ``model``, ``data`` and ``out`` are filled in by the pipeline.

    Every field but ``preset`` is the ``rlhf.sft.SFTConfig`` field of the same name and is copied
    by name (``pipeline.sft_config``); this narrower set (and the longer ``max_len`` default for
    reasoning models) is the calibrate YAML's ``sft:`` section."""

    preset: Preset | None = None
    """A Table 2 preset name (``TABLE2_PRESETS``); keys given here override it."""
    method: Literal["lora", "full"] = "lora"
    """``lora`` (default; merges are adapter scalings) or ``full`` (merges stream through ``bai``)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA rank, alpha, dropout and targets (q, k, v, o, gate, up, down)."""
    epochs: Annotated[int, Range(1, None)] = 1
    """Passes over the training set, >= 1."""
    lr: Annotated[float, Range(0, 1, lo_open=True)] = 5e-5
    """Peak learning rate, in (0, 1]."""
    batch_size: Annotated[int, Range(1, None)] = 16
    """Effective batch size, >= 1 (a multiple of ``micro_batch_size`` when that is smaller)."""
    micro_batch_size: Annotated[int, Range(1, None)] = 4
    """Per-rank micro-batch, >= 1 (capped at ``batch_size``)."""
    max_len: Annotated[int, Range(2, None)] = 4096
    """Longer examples (prompt + response tokens, >= 2) are dropped and counted."""
    warmup_ratio: Annotated[float, Range(0, 1, hi_open=True)] = 0.03
    """Linear warm-up fraction of the optimizer steps, in [0, 1); constant afterwards."""
    weight_decay: Annotated[float, Range(0, None)] = 0.0
    """AdamW weight decay, >= 0."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Training dtype (float32 or bfloat16)."""
    gradient_checkpointing: bool = False
    """Activation recomputation."""


@dataclass
class SearchSettings:
    """Search for the largest SFT weight with reasoning rate >= rho_min (equation 5)."""

    method: Literal["binary", "grid"] = "binary"
    """``binary`` (probes a=1, then bisects; at most ``max_steps`` probes) or ``grid`` ({0, 1/K, ..., 1})."""
    rho_min: Annotated[float, Range(0, 1, lo_open=True)] = 0.9
    """Minimum acceptable calibration reasoning rate, in (0, 1]."""
    grid_k: Annotated[int, Range(1, 1000)] = 10
    """Grid resolution K, in [1, 1000] (K + 1 probes)."""
    max_steps: Annotated[int, Range(1, 100)] = 8
    """Most probes a binary search makes, in [1, 100]."""
    early_stop: bool = True
    """Binary search stops at the first probe with rho in [rho_min, 1) (the paper's rule)."""


@dataclass
class EstimatorSettings:
    """How rho(M_a, D_cal) is estimated."""

    method: Literal["logit", "prefix"] = "logit"
    """``logit`` (one forward pass per prompt) or ``prefix`` (sample the first tokens)."""
    statistic: Literal["mean", "count"] = "mean"
    """For ``logit``: ``mean`` of P(non-empty) or ``count`` of prompts with P(non-empty) > threshold."""
    threshold: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] = 0.5
    """Threshold of the ``count`` statistic, in (0, 1)."""
    prefix_tokens: Annotated[int, Range(1, None)] = 8
    """k: tokens generated after the generation prompt by the prefix estimator, >= 1."""
    samples: Annotated[int, Range(1, None)] = 4
    """Samples per prompt for the prefix estimator, >= 1."""
    temperature: Annotated[float, Range(0, None)] = 1.0
    """Sampling temperature of the prefix estimator, >= 0 (0: greedy, one sample)."""
    batch_size: Annotated[int, Range(1, None)] = 16
    """Prompts per forward pass, >= 1."""
    max_prompts: Annotated[int, Range(1, None)] | None = None
    """Use at most this many calibration prompts, >= 1 (None: all)."""
    compare: bool = False
    """Also run the other estimator at every probe and record it in the probe table."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` (cuda if available), ``cpu`` or ``cuda``."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Evaluation dtype (float32, bfloat16, float16)."""


@dataclass
class CalibrateConfig:
    """A whole calibration run: SFT with an empty trace, search, final checkpoint, report."""

    model: str = ""
    """Local path of the reasoning model M (Hugging Face checkpoint, safetensors)."""
    train_data: str = ""
    """JSONL of (input, output) training records (no reasoning traces)."""
    cal_data: str = ""
    """JSONL of held-out calibration records (only the input field is used)."""
    input_field: str = "input"
    """Record key of the task input."""
    output_field: str = "output"
    """Record key of the target output (training data only)."""
    prompt_template: str = "{input}"
    """User-message template with ``{input}``, or an appendix-B preset name (rust, math500, summarization)."""
    system_prompt: str | None = None
    """Optional system message."""
    reasoning: ReasoningSettings = field(default_factory=ReasoningSettings)
    """Reasoning markers and the empty-trace serialization."""
    sft: SFTSettings = field(default_factory=SFTSettings)
    """SFT hyperparameters (or a Table 2 preset)."""
    search: SearchSettings = field(default_factory=SearchSettings)
    """Search over the SFT weight."""
    estimator: EstimatorSettings = field(default_factory=EstimatorSettings)
    """Reasoning-rate estimator."""
    seed: Annotated[int, Range(0, None)] = 0
    """Seed for SFT and sampling, an integer >= 0."""


def load_config(data: dict, where: str = "config") -> CalibrateConfig:
    """Build a ``CalibrateConfig`` from a mapping: presets applied, every key and value checked.

    Raises ``CalibrateError`` naming the offending key. File contents (fields, tokenizer markers)
    are checked by the pipeline's ``preflight`` before any work.
    """
    if data is not None and not isinstance(data, dict):
        raise CalibrateError(f"{where}: expected a mapping of keys, got {type(data).__name__}")
    data = dict(data or {})
    sft = data.get("sft") or {}
    if not isinstance(sft, dict):
        raise CalibrateError(f"{where}.sft: expected a mapping, got {sft!r}")
    sft = dict(sft)
    preset = coerce(Preset | None, sft.get("preset"), f"{where}.sft.preset", CalibrateError)
    if preset is not None:   # the preset's keys first, so the ones given here override them
        sft = {**TABLE2_PRESETS[preset], **sft}
    data["sft"] = sft
    cfg = build(CalibrateConfig, data, where, CalibrateError)
    cfg.prompt_template = PROMPT_TEMPLATES.get(cfg.prompt_template, cfg.prompt_template)
    validate(cfg, where)
    return cfg


def validate(cfg: CalibrateConfig, where: str = "config") -> None:
    """Checks across fields and of paths (existence only); raises ``CalibrateError`` naming the key.

    Ranges and enums of single fields are in the types and were checked by ``build``."""
    s = cfg.sft
    checks = [
        ("{input}" in cfg.prompt_template, "prompt_template",
         f"must contain {{input}} or name a preset ({sorted(PROMPT_TEMPLATES)})"),
        (bool(cfg.reasoning.start), "reasoning.start", "must be non-empty"),
        (bool(cfg.reasoning.end), "reasoning.end", "must be non-empty"),
        (cfg.reasoning.end in cfg.reasoning.empty_trace, "reasoning.empty_trace",
         f"must contain the end marker {cfg.reasoning.end!r}"),
        (bool(s.lora.targets) and all(s.lora.targets), "sft.lora.targets",
         "must name at least one module"),
        (s.batch_size % min(s.micro_batch_size, s.batch_size) == 0, "sft.batch_size",
         f"{s.batch_size} is not a multiple of sft.micro_batch_size ({s.micro_batch_size})"),
        (bool(cfg.input_field), "input_field", "must be non-empty"),
        (bool(cfg.output_field), "output_field", "must be non-empty"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise CalibrateError(f"{where}.{key}: {msg}")
    for key in ("model", "train_data", "cal_data"):
        if not getattr(cfg, key):
            raise CalibrateError(f"{where}.{key}: required")
    if not Path(cfg.model).is_dir():
        raise CalibrateError(f"{where}.model: {cfg.model} does not exist or is not a directory")
    if not Path(cfg.model, "config.json").is_file():
        raise CalibrateError(f"{where}.model: {cfg.model} is not a Hugging Face checkpoint (no config.json)")
    for key in ("train_data", "cal_data"):
        if not Path(getattr(cfg, key)).is_file():
            raise CalibrateError(f"{where}.{key}: file not found: {getattr(cfg, key)}")


def to_dict(cfg: CalibrateConfig) -> dict:
    """The resolved config as plain data (written to the run directory)."""
    return dataclasses.asdict(cfg)
