"""Typed configuration of ``bai calibrate`` and the paper's presets (seed 000, Table 2, appendix B).

Convention: the merge weight searched here is the weight of the **SFT model**,
``M_a = (1 - a) * M + a * M_sft`` (the paper's alpha), named ``sft_weight`` everywhere. (In
``bai merge`` alpha is the base-model weight; the two papers use opposite conventions.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.sft import LoraSettings
from bairlhf.typed_config import build

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

    preset: str | None = None
    """A Table 2 preset name (``TABLE2_PRESETS``); keys given here override it."""
    method: str = "lora"
    """``lora`` (default; merges are adapter scalings) or ``full`` (merges stream through ``bai``)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA rank, alpha, dropout and targets (q, k, v, o, gate, up, down)."""
    epochs: int = 1
    """Passes over the training set."""
    lr: float = 5e-5
    """Peak learning rate."""
    batch_size: int = 16
    """Effective batch size."""
    micro_batch_size: int = 4
    """Per-rank micro-batch."""
    max_len: int = 4096
    """Longer examples are dropped (and counted)."""
    warmup_ratio: float = 0.03
    """Linear warm-up fraction, then constant."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage."""
    dtype: str = "float32"
    """Training dtype (float32 or bfloat16)."""
    gradient_checkpointing: bool = False
    """Activation recomputation."""


@dataclass
class SearchSettings:
    """Search for the largest SFT weight with reasoning rate >= rho_min (equation 5)."""

    method: str = "binary"
    """``binary`` (probes a=1, then bisects; at most ``max_steps`` probes) or ``grid`` ({0, 1/K, ..., 1})."""
    rho_min: float = 0.9
    """Minimum acceptable calibration reasoning rate, in (0, 1]."""
    grid_k: int = 10
    """Grid resolution K."""
    max_steps: int = 8
    """Most probes a binary search makes."""
    early_stop: bool = True
    """Binary search stops at the first probe with rho in [rho_min, 1) (the paper's rule)."""


@dataclass
class EstimatorSettings:
    """How rho(M_a, D_cal) is estimated."""

    method: str = "logit"
    """``logit`` (one forward pass per prompt) or ``prefix`` (sample the first tokens)."""
    statistic: str = "mean"
    """For ``logit``: ``mean`` of P(non-empty) or ``count`` of prompts with P(non-empty) > threshold."""
    threshold: float = 0.5
    """Threshold of the ``count`` statistic."""
    prefix_tokens: int = 8
    """k: tokens generated after the generation prompt by the prefix estimator."""
    samples: int = 4
    """Samples per prompt for the prefix estimator."""
    temperature: float = 1.0
    """Sampling temperature of the prefix estimator (0: greedy, one sample)."""
    batch_size: int = 16
    """Prompts per forward pass."""
    max_prompts: int | None = None
    """Use at most this many calibration prompts (None: all)."""
    compare: bool = False
    """Also run the other estimator at every probe and record it in the probe table."""
    device: str = "auto"
    """``auto`` (cuda if available), ``cpu`` or ``cuda``."""
    dtype: str = "float32"
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
    seed: int = 0
    """Seed for SFT and sampling."""


def load_config(data: dict, where: str = "config") -> CalibrateConfig:
    """Build a ``CalibrateConfig`` from a mapping: presets applied, every value checked.

    Raises ``ValueError`` naming the offending key. File contents (fields, tokenizer markers)
    are checked by the pipeline before any work.
    """
    data = dict(data or {})
    sft = dict(data.get("sft") or {})
    preset = sft.get("preset")
    if preset is not None:
        if preset not in TABLE2_PRESETS:
            raise ValueError(f"{where}.sft.preset: unknown preset {preset!r}; known: {sorted(TABLE2_PRESETS)}")
        sft = {**TABLE2_PRESETS[preset], **sft}
    data["sft"] = sft
    cfg = build(CalibrateConfig, data, where)
    cfg.prompt_template = PROMPT_TEMPLATES.get(cfg.prompt_template, cfg.prompt_template)
    validate(cfg, where)
    return cfg


def validate(cfg: CalibrateConfig, where: str = "config") -> None:
    """Value checks (no file I/O beyond existence); raises ``ValueError`` naming the key."""
    s, e = cfg.search, cfg.estimator
    checks = [
        (isinstance(s.rho_min, (int, float)) and 0 < s.rho_min <= 1, "search.rho_min",
         f"must be in (0, 1], got {s.rho_min!r}"),
        (s.method in ("binary", "grid"), "search.method", f"must be 'binary' or 'grid', got {s.method!r}"),
        (int(s.grid_k) >= 1, "search.grid_k", f"must be >= 1, got {s.grid_k}"),
        (int(s.max_steps) >= 1, "search.max_steps", f"must be >= 1, got {s.max_steps}"),
        (e.method in ("logit", "prefix"), "estimator.method", f"must be 'logit' or 'prefix', got {e.method!r}"),
        (e.statistic in ("mean", "count"), "estimator.statistic", f"must be 'mean' or 'count', got {e.statistic!r}"),
        (0 < e.threshold < 1, "estimator.threshold", f"must be in (0, 1), got {e.threshold}"),
        (int(e.prefix_tokens) >= 1, "estimator.prefix_tokens", f"must be >= 1, got {e.prefix_tokens}"),
        (int(e.samples) >= 1, "estimator.samples", f"must be >= 1, got {e.samples}"),
        (e.temperature >= 0, "estimator.temperature", f"must be >= 0, got {e.temperature}"),
        (int(e.batch_size) >= 1, "estimator.batch_size", f"must be >= 1, got {e.batch_size}"),
        (e.max_prompts is None or int(e.max_prompts) >= 1, "estimator.max_prompts", "must be >= 1 or null"),
        (e.device in ("auto", "cpu", "cuda"), "estimator.device", f"must be auto, cpu or cuda, got {e.device!r}"),
        (e.dtype in ("float32", "bfloat16", "float16"), "estimator.dtype", f"unknown dtype {e.dtype!r}"),
        ("{input}" in cfg.prompt_template, "prompt_template",
         f"must contain {{input}} or name a preset ({sorted(PROMPT_TEMPLATES)})"),
        (bool(cfg.reasoning.start) and bool(cfg.reasoning.end), "reasoning.start/end", "must be non-empty"),
        (cfg.reasoning.end in cfg.reasoning.empty_trace, "reasoning.empty_trace",
         f"must contain the end marker {cfg.reasoning.end!r}"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ValueError(f"{where}.{key}: {msg}")
    for key in ("model", "train_data", "cal_data"):
        if not getattr(cfg, key):
            raise ValueError(f"{where}.{key}: required")
    if not Path(cfg.model, "config.json").is_file():
        raise ValueError(f"{where}.model: {cfg.model} is not a Hugging Face checkpoint (no config.json)")
    for key in ("train_data", "cal_data"):
        if not Path(getattr(cfg, key)).is_file():
            raise ValueError(f"{where}.{key}: file not found: {getattr(cfg, key)}")


def to_dict(cfg: CalibrateConfig) -> dict:
    """The resolved config as plain data (written to the run directory)."""
    return dataclasses.asdict(cfg)
