"""Supervised fine-tuning (full or LoRA) of a causal LM on DeepSpeed: ``rlhf sft CONFIG.yaml``.

A general SFT trainer: point it at a local Hugging Face checkpoint and a JSONL file of
(prompt, response) records and it trains with next-token loss on the **response tokens only**.

Data. Each JSONL line is an object with a prompt field and a response field (names set by
``prompt_field`` / ``response_field``). The prompt is a string (becomes one user message, after
an optional ``system_prompt``) or a list of ``{"role", "content"}`` messages. The prompt is
rendered with the tokenizer's chat template and its generation prompt; the response is the text
the model should produce after it, followed by the EOS token (added unless the response already
ends with it).

Prefilled reasoning templates. Some reasoning templates end the generation prompt with the
start of the reasoning block (``<think>\\n`` for DeepSeek-R1/QwQ/Qwen3-Thinking, ``<think>`` for
OLMo-3-Think). If the prompt ends with ``reasoning_start`` (plus optional whitespace) and the
response begins with that same text, the overlap is removed from the response, so the response
is tokenized exactly as the model continues after the prefill at inference. A response that
does not continue such a prefill is an error (the model would be trained on a path it never takes).

LoRA (``method: lora``, peft) targets q, k, v, o, gate, up, down projections by default; the
output is an adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) plus the
tokenizer. ``method: full`` writes a full Hugging Face checkpoint (safetensors). Either way the
output is written to a temporary sibling directory and renamed into place when complete.

Bad input (an unknown key, a value out of its documented range, a YAML syntax error, a missing
file, a malformed JSONL line, an output that exists or overlaps an input) is one ``SFTError``
naming the key or file:line, raised before any work; nothing is written until the output is
complete. ``--force`` replaces only an earlier output of ``rlhf sft`` (its marker file,
``bairlhf.outputs``), never an input.

DeepSpeed runs everywhere (ZeRO stage 0-3; on CPU through gloo in a single process) through the
PPO engines' own setup, ``rlhf.engines.deepspeed_engine.DeepSpeedTrainEngine``: torch AdamW (betas
0.9, 0.999) as DeepSpeed's client optimizer (no JIT-compiled ops) and its learning-rate schedule,
``warmup_factor`` with ``int(warmup_ratio x optimizer steps)`` warm-up steps. Saving gathers the
weights on every rank (ZeRO-3 included) and rank 0 writes. Launch several processes with the
``deepspeed`` or ``torchrun`` launcher for data parallelism; rank and world size come from the usual
environment variables, e.g.
``deepspeed --num_gpus 8 $(which rlhf) sft CONFIG.yaml`` or
``torchrun --nproc_per_node 8 -m rlhf.cli sft CONFIG.yaml``.

Example config (every key is an ``SFTConfig`` field)::

    model: /models/OpenThinker-7B
    data: train.jsonl
    out: runs/sft-rust
    prompt_field: prompt
    response_field: response
    method: lora
    epochs: 5
    lr: 5.0e-5
    batch_size: 16
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from bairlhf.errors import UserError
from bairlhf.jsonl import read_jsonl as _read_jsonl
from bairlhf.outputs import check_output, mark_output, replace_dir
from bairlhf.typed_config import Range, build

COMMAND = "rlhf sft"
"""The marker an ``rlhf sft`` output carries (``bairlhf.outputs``)."""


class SFTError(UserError):
    """Bad ``rlhf sft`` input; the message names the key or the file and line."""


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    """LoRA adapter shape (peft). The paper's rank is not stated; these are our defaults."""

    r: Annotated[int, Range(1, None)] = 16
    """Adapter rank (>= 1)."""
    alpha: Annotated[float, Range(0, None, lo_open=True)] = 32.0
    """peft ``lora_alpha`` (> 0); the adapter is scaled by alpha / r."""
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.05
    """Dropout on the adapter input during training, in [0, 1)."""
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Module names that receive adapters (attention q/k/v/o and MLP gate/up/down by default)."""


@dataclass
class SFTConfig:
    """Everything one SFT run needs. Unknown keys in YAML are an error."""

    model: str = ""
    """Local path of the Hugging Face checkpoint to fine-tune (safetensors)."""
    data: str = ""
    """JSONL file of training records."""
    out: str = ""
    """Output directory (must not exist unless ``force``)."""
    prompt_field: str = "prompt"
    """Record key of the prompt: a string or a list of chat messages."""
    response_field: str = "response"
    """Record key of the response text (the only tokens that carry loss)."""
    system_prompt: str | None = None
    """Optional system message put before string prompts."""
    reasoning_start: str | None = "<think>"
    """Reasoning-start marker whose prefill (at the end of the generation prompt) is stripped
    from responses that begin with it; ``null`` disables the check."""
    method: Literal["lora", "full"] = "lora"
    """``lora`` (peft adapter) or ``full`` (all weights)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings (``method: lora`` only)."""
    epochs: Annotated[int, Range(1, None)] = 1
    """Passes over the data (>= 1)."""
    lr: Annotated[float, Range(0, 1, lo_open=True)] = 5e-5
    """Peak learning rate (AdamW), in (0, 1]."""
    batch_size: Annotated[int, Range(1, None)] = 16
    """Effective (global) batch size in examples per optimizer step (>= 1)."""
    micro_batch_size: Annotated[int, Range(1, None)] = 4
    """Examples per forward/backward on each rank (>= 1); gradient accumulation makes up the rest."""
    max_len: Annotated[int, Range(2, None)] = 2048
    """Examples longer than this (prompt + response tokens, >= 2) are dropped and counted."""
    warmup_ratio: Annotated[float, Range(0, 1, hi_open=True)] = 0.03
    """Fraction of optimizer steps with linear warm-up, in [0, 1); constant learning rate afterwards
    (``rlhf.engines.deepspeed_engine.warmup_factor`` with ``int(warmup_ratio x steps)`` warm-up steps)."""
    weight_decay: Annotated[float, Range(0, None)] = 0.0
    """AdamW weight decay (>= 0)."""
    grad_clip: Annotated[float, Range(0, None)] = 1.0
    """Gradient-norm clipping (>= 0; 0 disables)."""
    zero_stage: Annotated[int, Range(0, 3)] = 0
    """DeepSpeed ZeRO stage, 0-3."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Training dtype: float32 or bfloat16."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    seed: Annotated[int, Range(0, None)] = 0
    """Seed for initialisation of the adapter and data order (>= 0)."""
    log_every: Annotated[int, Range(1, None)] = 10
    """Write a metrics line every N optimizer steps (>= 1)."""
    force: bool = False
    """Replace an existing ``out`` directory, only if an earlier ``rlhf sft`` wrote it."""


# ----------------------------------------------------------------------------- config


def load_config(data: dict, where: str = "sft") -> SFTConfig:
    """Build and validate an ``SFTConfig`` from a mapping (errors name the offending key)."""
    cfg = build(SFTConfig, data, where, SFTError, unknown="{where}: unknown key(s) {keys}; known keys: {known}")
    validate_config(cfg, where)
    return cfg


def validate_config(cfg: SFTConfig, where: str = "sft", *, need_paths: bool = True) -> None:
    """Cross-field and path checks (ranges and choices are part of the field types); raises
    ``SFTError`` naming the first bad key, before any work is done. Only reads."""
    if not cfg.lora.targets:
        raise SFTError(f"{where}.lora.targets: must name at least one module")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise SFTError(f"{where}.batch_size: {cfg.batch_size} is not a multiple of micro_batch_size x world size "
                       f"({cfg.micro_batch_size} x {world})")
    if not need_paths:
        return
    for key in ("model", "data", "out"):
        if not getattr(cfg, key):
            raise SFTError(f"{where}.{key}: required")
    check_paths(cfg, where)


def check_paths(cfg: SFTConfig, where: str = "sft", *, data: bool = True) -> Path:
    """The model is a checkpoint, the data file exists and ``out`` may be (re)placed
    (``bairlhf.outputs.check_output``: never an input; ``force`` only over an earlier ``rlhf sft``
    output). Returns ``out`` resolved."""
    if not Path(cfg.model, "config.json").is_file():
        raise SFTError(f"{where}.model: {cfg.model} is not a Hugging Face checkpoint (no config.json)")
    if data and not Path(cfg.data).is_file():
        raise SFTError(f"{where}.data: file not found: {cfg.data}")
    try:
        return check_output(cfg.out, COMMAND, [cfg.model, cfg.data if data else None], cfg.force)
    except UserError as e:
        raise SFTError(f"{where}.out: {e}") from None


# ----------------------------------------------------------------------------- data


def read_jsonl(path: str | Path, required: list[str], where: str) -> list[dict]:
    """Read a JSONL file; every record must hold the ``required`` keys (error names file, line, key)."""
    return _read_jsonl(path, required_fields=required, set_by=where, error=SFTError)


def prompt_messages(prompt: Any, system_prompt: str | None = None) -> list[dict]:
    """A prompt as chat messages: a string becomes one user message (after the system prompt)."""
    if isinstance(prompt, str):
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return msgs + [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        return list(prompt)
    raise ValueError("prompt must be a string or a list of {'role', 'content'} messages")


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The chat template's rendering of ``messages`` with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat_template; SFT needs one to render prompts")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def strip_prefill(prompt_text: str, response: str, reasoning_start: str | None) -> str:
    """Remove from ``response`` the reasoning prefill the generation prompt already ends with.

    The prefill is ``reasoning_start`` followed only by whitespace at the very end of the
    prompt. Raises ``ValueError`` when a prefilled prompt meets a response that does not
    continue it.
    """
    if not reasoning_start:
        return response
    idx = prompt_text.rfind(reasoning_start)
    if idx < 0 or prompt_text[idx + len(reasoning_start):].strip():
        return response
    prefill = prompt_text[idx:]
    if response.startswith(prefill):
        return response[len(prefill):]
    if response.startswith(reasoning_start):
        raise ValueError(f"response starts with {response[:len(prefill) + 8]!r} but the template already "
                         f"prefilled {prefill!r}; serialize the response to continue the prefill")
    raise ValueError(f"the chat template prefills {prefill!r} but the response does not continue it "
                     f"(starts with {response[:16]!r})")


def tokenize_example(tokenizer, messages: list[dict], response: str,
                     reasoning_start: str | None = "<think>") -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) exactly as the model sees them at inference.

    The prompt is the chat template with its generation prompt; the response is tokenized on
    its own after the prefill is stripped (see ``strip_prefill``) and ends with EOS.
    """
    prompt_text = render_prompt(tokenizer, messages)
    body = strip_prefill(prompt_text, response, reasoning_start)
    eos = tokenizer.eos_token
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    resp_ids = tokenizer(body, add_special_tokens=False)["input_ids"]
    if eos is not None and not body.endswith(eos):
        resp_ids = resp_ids + [tokenizer.eos_token_id]
    return prompt_ids, resp_ids


def build_examples(tokenizer, records: list[dict], cfg: SFTConfig) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Tokenize records into (input_ids, labels) with labels -100 on prompt tokens.

    Returns the examples and the number dropped for exceeding ``max_len``.
    """
    examples, dropped = [], 0
    for i, rec in enumerate(records):
        try:
            msgs = prompt_messages(rec[cfg.prompt_field], cfg.system_prompt)
            if not isinstance(rec[cfg.response_field], str):
                raise ValueError(f"field {cfg.response_field!r} must be a string")
            p, r = tokenize_example(tokenizer, msgs, rec[cfg.response_field], cfg.reasoning_start)
        except ValueError as e:
            raise SFTError(f"{cfg.data or 'records'}: record {i}: {e}") from None
        if len(p) + len(r) > cfg.max_len:
            dropped += 1
            continue
        examples.append((p + r, [-100] * len(p) + r))
    if not examples:
        raise SFTError(f"sft.max_len: all {len(records)} records are longer than {cfg.max_len} tokens")
    return examples, dropped


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-pad a micro-batch into input_ids / attention_mask / labels tensors."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (x, y) in enumerate(batch):
        ids[row, :len(x)] = torch.tensor(x)
        labels[row, :len(y)] = torch.tensor(y)
        mask[row, :len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------- model


def load_model(path: str | Path, dtype: str = "float32"):
    """Load a causal LM from a local safetensors checkpoint (no remote code, no downloads)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype), use_safetensors=True,
                                                trust_remote_code=False, local_files_only=True)


def add_lora(model, lora: LoraSettings):
    """Wrap ``model`` in a peft LoRA adapter on the configured target modules."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in lora.targets if t not in names]
    if missing:
        raise SFTError(f"sft.lora.targets: model has no module named {missing}")
    cfg = LoraConfig(r=int(lora.r), lora_alpha=float(lora.alpha), lora_dropout=float(lora.dropout),
                     target_modules=list(lora.targets), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def _save(engine, tokenizer, out: Path, meta: dict, metrics: list[dict], lora: bool) -> None:
    """Write the adapter (LoRA) or the full checkpoint to a temporary sibling, then rename. Every rank
    calls it (the engine gathers ZeRO-3 partitions collectively), rank 0 writes; every rank returns
    once ``out`` is in place."""
    import torch.distributed as dist

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if engine.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    engine.save_pretrained(tmp, trainable_only=lora)  # LoRA: only the adapter is gathered and written
    if engine.rank == 0:
        tokenizer.save_pretrained(str(tmp))
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in metrics))
        (tmp / "sft_meta.json").write_text(json.dumps(meta, indent=2))
        mark_output(tmp, COMMAND)
        replace_dir(tmp, out)  # an existing out was checked by check_output (an earlier rlhf sft output)
    dist.barrier()


# ----------------------------------------------------------------------------- training


def train(cfg: SFTConfig, records: list[dict] | None = None) -> Path:
    """Run SFT and write ``cfg.out``; returns its path.

    ``records`` (prompt/response dicts) may be passed in memory instead of reading ``cfg.data``.
    The output holds the adapter or full weights, the tokenizer, ``sft_meta.json`` (config,
    example counts, final loss, time) and ``metrics.jsonl`` (loss, the mean over all ranks'
    micro-batches of the step, and lr per logged step). Every rank calls it and returns once the
    output is in place.
    """
    import torch
    from bairlhf.progress import progress as tqdm  # plain lines in non-TTY logs
    from transformers import AutoTokenizer

    validate_config(cfg, need_paths=False)
    out = Path(cfg.out)
    if not cfg.model or not cfg.out:
        raise SFTError(f"sft.{'model' if not cfg.model else 'out'}: required")
    check_paths(cfg, data=records is None)  # before any work: model, data, out (never an input)
    if records is None:
        records = read_jsonl(cfg.data, [cfg.prompt_field, cfg.response_field], "sft.prompt_field/response_field")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
    examples, dropped = build_examples(tokenizer, records, cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    from rlhf.engines.deepspeed_engine import DeepSpeedTrainEngine, EngineSpec, init_distributed

    created = init_distributed()
    engine = None
    try:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        gas = cfg.batch_size // (cfg.micro_batch_size * world)
        torch.manual_seed(cfg.seed)
        model = load_model(cfg.model, cfg.dtype)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        if cfg.method == "lora":
            model = add_lora(model, cfg.lora)
        micro_per_epoch = math.ceil(len(examples) / (cfg.micro_batch_size * world))
        micro_per_epoch = math.ceil(micro_per_epoch / gas) * gas
        total_steps = cfg.epochs * micro_per_epoch // gas
        spec = EngineSpec(lr=float(cfg.lr), warmup_steps=int(cfg.warmup_ratio * total_steps),
                          weight_decay=float(cfg.weight_decay), betas=(0.9, 0.999), grad_clip=float(cfg.grad_clip),
                          micro_batch_size=cfg.micro_batch_size, grad_accum=gas, seed=cfg.seed,
                          zero_stage=cfg.zero_stage, bf16=cfg.dtype == "bfloat16")
        engine = DeepSpeedTrainEngine(model, spec)
        engine.train(True)
        gen = torch.Generator().manual_seed(cfg.seed)
        t0, step, window, final_loss = time.time(), 0, [], float("nan")
        metrics_lines = []
        bar = tqdm(total=total_steps, desc=f"sft ({cfg.method})", disable=rank != 0)
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(examples), generator=gen).tolist()
            need = micro_per_epoch * cfg.micro_batch_size * world
            order = (order * math.ceil(need / len(order)))[:need]
            mine = order[rank::world]
            for m in range(micro_per_epoch):
                batch = collate([examples[i] for i in mine[m * cfg.micro_batch_size:(m + 1) * cfg.micro_batch_size]],
                                pad_id)
                batch = {k: v.to(engine.engine.device) for k, v in batch.items()}
                loss = engine.engine(**batch).loss
                engine.backward(loss / gas)  # the mean over the accumulated micro-batches
                rec = engine.step()
                window.append(loss.item())
                if (m + 1) % gas == 0:
                    step += 1
                    final_loss = sum(window) / len(window)
                    if world > 1:  # the mean over every rank's micro-batches of the step
                        total = torch.tensor(final_loss, dtype=torch.float64)
                        torch.distributed.all_reduce(total)
                        final_loss = float(total) / world
                    window = []
                    bar.update(1)
                    bar.set_postfix(loss=f"{final_loss:.4f}")
                    if step % cfg.log_every == 0 or step == total_steps:
                        metrics_lines.append({"step": step, "epoch": epoch, "loss": final_loss, "lr": rec["lr"]})
        bar.close()
        meta = {"config": dataclasses.asdict(cfg), "examples": len(examples), "dropped_too_long": dropped,
                "optimizer_steps": step, "final_loss": final_loss, "seconds": time.time() - t0,
                "world_size": world}
        engine.train(False)
        _save(engine, tokenizer, out, meta, metrics_lines, lora=cfg.method == "lora")
    finally:
        if engine is not None:
            engine.destroy(group=created)  # also drops DeepSpeed's cached groups
        elif created:
            torch.distributed.destroy_process_group()
    return out
