"""`rlhf rm CONFIG.yaml`: train a Bradley-Terry reward model on DeepSpeed.

Data: JSONL, one preference pair per line, ``{"prompt": ..., "chosen": ..., "rejected": ...}``
(strings). The prompt is rendered with the tokenizer's chat template as a user message with the
generation prompt; each response is appended to it followed by EOS, which is the sequence the PPO
loop scores (prompt + response up to EOS). Tokenizers without a chat template use plain
concatenation.

Model: ``AutoModelForSequenceClassification`` with ``num_labels=1`` loaded from a causal-LM
checkpoint (the score head is new) or from an existing reward model. The score of a sequence is
the head's output at its last non-pad token. Loss: ``-log sigmoid(r_chosen - r_rejected)``,
averaged over the pairs of a batch.

Bad input (an unknown key, a value out of its documented range, a YAML syntax error, a missing
file, a malformed JSONL line, an output that exists or overlaps an input) is one ``RMError``
naming the key or file:line, raised before any work.

Output (written to a temporary sibling directory and renamed into place; an existing directory
is refused unless ``force: true`` or ``--force``, and even then replaced only if an earlier
``rlhf rm`` wrote it (``bairlhf.outputs`` marker); an output that is, contains or lies inside an
input is refused): the model and tokenizer in Hugging Face format,
``rm_stats.json`` with the score mean/std over every training response (chosen and rejected) for
reward normalization, the pair accuracy on the training and (if given) evaluation data, and
``rm_config.yaml``, the resolved config.

Example config (all keys; only ``model``, ``data`` and ``out`` are required)::

    model: path/to/causal-lm        # or a reward model to continue training
    data: pairs.jsonl
    out: runs/rm
    eval_data: null                 # optional held-out pairs (JSONL)
    max_length: 1024                # longer sequences are refused, naming the line
    epochs: 1
    batch_size: 8                   # pairs per optimizer step
    micro_batch_size: 8             # pairs per forward (gradient accumulation = batch / micro)
    lr: 1.0e-5
    weight_decay: 0.0
    warmup_steps: 0                 # linear warm-up, then constant (warmup_factor)
    grad_clip: 1.0
    zero_stage: 0
    seed: 0
    force: false

Training runs on the PPO engines' own DeepSpeed setup, ``rlhf.engines.deepspeed_engine.DeepSpeedTrainEngine``
(torch AdamW with betas 0.9, 0.999; the learning rate follows its ``warmup_factor``); saving gathers
the weights on every rank (ZeRO-3 included) and rank 0 writes.

Command line: ``rlhf rm CONFIG.yaml [key=value ...] [--force]`` (``key=value`` overrides a key).
Multi-process data parallel: launch with ``torchrun``/``deepspeed``; a single process starts its own
one-rank gloo/NCCL group.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import yaml

from bairlhf.errors import UserError
from bairlhf.jsonl import read_jsonl
from bairlhf.outputs import check_output, mark_output, replace_dir
from bairlhf.typed_config import Range, build
from bairlhf.yamlio import load_mapping, parse_value

COMMAND = "rlhf rm"
"""The marker an ``rlhf rm`` output carries (``bairlhf.outputs``)."""


class RMError(UserError):
    """Bad ``rlhf rm`` input; the message names the key or the file and line."""


@dataclass
class RMConfig:
    """A reward-model training run."""

    model: str
    """causal-LM (or sequence-classification) checkpoint directory; its tokenizer is used"""
    data: str
    """training pairs, JSONL with keys prompt, chosen, rejected"""
    out: str
    """output directory (refused if it exists, unless force)"""
    eval_data: str | None = None
    """optional held-out pairs (JSONL) for pair accuracy"""
    max_length: Annotated[int, Range(2, None)] = 1024
    """maximum tokens of prompt + response + EOS (>= 2); a longer pair is an error naming its line"""
    epochs: Annotated[int, Range(1, None)] = 1
    """passes over the training pairs (>= 1)"""
    batch_size: Annotated[int, Range(1, None)] = 8
    """pairs per optimizer step (over all data-parallel ranks; >= 1)"""
    micro_batch_size: Annotated[int, Range(1, None)] = 8
    """pairs per forward pass per rank (>= 1)"""
    lr: Annotated[float, Range(0, 1, lo_open=True)] = 1e-5
    """AdamW learning rate (after warm-up), in (0, 1]"""
    weight_decay: Annotated[float, Range(0, None)] = 0.0
    """AdamW weight decay (>= 0)"""
    warmup_steps: Annotated[int, Range(0, None)] = 0
    """linear warm-up steps (>= 0), then constant (``rlhf.engines.deepspeed_engine.warmup_factor``)"""
    grad_clip: Annotated[float, Range(0, None)] = 1.0
    """gradient-norm clipping (>= 0; 0: off)"""
    zero_stage: Annotated[int, Range(0, 3)] = 0
    """DeepSpeed ZeRO stage, 0-3"""
    seed: Annotated[int, Range(0, None)] = 0
    """shuffling and head initialization seed (>= 0)"""
    force: bool = False
    """replace an existing output directory, only if an earlier ``rlhf rm`` wrote it"""


def load_config(path: str | Path, overrides: list[str] = ()) -> RMConfig:
    """Read and validate a YAML config; ``overrides`` are ``key=value`` strings (YAML values).

    Raises ``RMError`` naming the key (or file and line) on bad input, before any work."""
    try:
        raw = load_mapping(path, "config")
    except UserError as e:
        raise RMError(str(e)) from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RMError(f"override {item!r} is not key=value")
        try:
            raw[key] = parse_value(value, key)
        except UserError as e:
            raise RMError(str(e)) from None
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict, source: str = "config") -> RMConfig:
    """Validate a mapping into an ``RMConfig``; one clear error naming the key. Ranges are part of the
    field types; the paths must exist and ``out`` may be (re)placed (``bairlhf.outputs.check_output``)."""
    missing = "{where}: missing required key {key!r}"
    cfg = build(RMConfig, raw, source, RMError, unknown="{where}: unknown key {key!r} (known: {known})",
                missing=missing)
    for key in ("model", "data", "out"):
        if not getattr(cfg, key):
            raise RMError(missing.format(where=source, key=key))
    if not Path(cfg.model).is_dir():
        raise RMError(f"{source}: model: directory not found: {cfg.model}")
    for key in ("data", "eval_data"):
        value = getattr(cfg, key)
        if value is not None and not Path(value).is_file():
            raise RMError(f"{source}: {key}: file not found: {value}")
    try:
        check_output(cfg.out, COMMAND, [cfg.model, cfg.data, cfg.eval_data], cfg.force)
    except UserError as e:
        raise RMError(f"{source}: out: {e}") from None
    return cfg


def read_pairs(path: str | Path) -> list[dict]:
    """Read preference pairs, checking every line before any training (``RMError`` naming file:line)."""
    def check(row: dict, where: str) -> None:
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row.get(key), str):
                raise RMError(f"{where}: key {key!r} missing or not a string")

    return read_jsonl(path, "pairs", check=check, error=RMError)

def check_data(cfg: RMConfig) -> tuple[list[dict], list[dict]]:
    """The training and evaluation pairs, every line checked (file:line) before any work."""
    return read_pairs(cfg.data), read_pairs(cfg.eval_data) if cfg.eval_data else []


def encode_pair_side(tokenizer, prompt: str, response: str) -> list[int]:
    """Token ids of prompt (chat template, generation prompt) + response + EOS."""
    if tokenizer.chat_template:
        prefix = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    else:
        prefix = prompt
    ids = tokenizer.encode(prefix + response, add_special_tokens=False)
    return ids + [tokenizer.eos_token_id]


def _encode_all(tokenizer, pairs: list[dict], max_length: int, source: str) -> list[tuple[list[int], list[int]]]:
    out = []
    for n, row in enumerate(pairs, 1):
        c = encode_pair_side(tokenizer, row["prompt"], row["chosen"])
        r = encode_pair_side(tokenizer, row["prompt"], row["rejected"])
        if max(len(c), len(r)) > max_length:
            raise RMError(f"{source}: pair {n} has {max(len(c), len(r))} tokens > max_length {max_length}")
        out.append((c, r))
    return out


def _pad(seqs: list[list[int]], pad_id: int):
    """Right-padded ids and attention mask (the classifier reads the last non-pad token)."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def _scores(engine, tokenizer, seqs: list[list[int]], micro: int):
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(seqs), micro):
            ids, mask = _pad(seqs[i: i + micro], tokenizer.pad_token_id)
            dev = engine.device
            out.append(engine(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits[:, 0].float().cpu())
    return torch.cat(out)


def pair_accuracy(engine, tokenizer, encoded, micro: int) -> float:
    """Fraction of pairs scored chosen > rejected."""
    c = _scores(engine, tokenizer, [p[0] for p in encoded], micro)
    r = _scores(engine, tokenizer, [p[1] for p in encoded], micro)
    return float((c > r).float().mean())


def train_reward_model(cfg: RMConfig, *, show_progress: bool = True) -> Path:
    """Train and save a reward model; returns the output directory. Every rank calls it and returns
    once the output is in place."""
    import torch
    import torch.distributed as dist
    from bairlhf.progress import progress as tqdm  # plain lines in non-TTY logs
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.engines.deepspeed_engine import DeepSpeedTrainEngine, EngineSpec, init_distributed

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise RMError(f"model: tokenizer at {cfg.model} needs a pad and an EOS token")
    train_pairs, eval_pairs = check_data(cfg)
    train = _encode_all(tokenizer, train_pairs, cfg.max_length, cfg.data)
    evals = _encode_all(tokenizer, eval_pairs, cfg.max_length, cfg.eval_data) if cfg.eval_data else []

    started = init_distributed()  # shared with rlhf sft and the PPO engines: one-rank group when not launched
    eng = None
    try:
        world, rank = dist.get_world_size(), dist.get_rank()
        if cfg.batch_size % (cfg.micro_batch_size * world):
            raise RMError(f"batch_size: {cfg.batch_size} is not divisible by micro_batch_size "
                          f"{cfg.micro_batch_size} x {world} ranks")
        accum = cfg.batch_size // (cfg.micro_batch_size * world)
        torch.manual_seed(cfg.seed)
        model = AutoModelForSequenceClassification.from_pretrained(cfg.model, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        spec = EngineSpec(lr=float(cfg.lr), warmup_steps=cfg.warmup_steps, weight_decay=float(cfg.weight_decay),
                          betas=(0.9, 0.999), grad_clip=float(cfg.grad_clip), micro_batch_size=cfg.micro_batch_size,
                          grad_accum=accum, seed=cfg.seed, zero_stage=cfg.zero_stage)
        eng = DeepSpeedTrainEngine(model, spec)
        engine = eng.engine  # the DeepSpeed engine: the raw sequence-classification forward
        rng = random.Random(cfg.seed)
        order = []
        for _ in range(cfg.epochs):
            idx = list(range(len(train)))
            rng.shuffle(idx)
            order += idx
        mine = order[rank::world]
        micro_batches = [mine[i: i + cfg.micro_batch_size] for i in range(0, len(mine), cfg.micro_batch_size)]
        micro_batches = micro_batches[: len(micro_batches) // accum * accum] or micro_batches
        eng.train(True)
        bar = tqdm(micro_batches, desc="rlhf rm", disable=not show_progress or rank != 0)
        for mb in bar:
            ids, mask = _pad([train[i][0] for i in mb] + [train[i][1] for i in mb], tokenizer.pad_token_id)
            scores = engine(input_ids=ids.to(engine.device), attention_mask=mask.to(engine.device)).logits[:, 0]
            loss = -torch.nn.functional.logsigmoid(scores[: len(mb)] - scores[len(mb):]).mean()
            if not torch.isfinite(loss):
                raise ValueError("non-finite loss; nothing was written")
            eng.backward(loss / accum)  # the mean over the accumulated micro-batches
            eng.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        eng.train(False)
        all_scores = torch.cat([_scores(engine, tokenizer, [p[0] for p in train], cfg.micro_batch_size * 2),
                                _scores(engine, tokenizer, [p[1] for p in train], cfg.micro_batch_size * 2)])
        stats = {
            "mean": float(all_scores.mean()),
            "std": float(all_scores.std()),
            "n": int(all_scores.numel()),
            "train_pair_accuracy": float((all_scores[: len(train)] > all_scores[len(train):]).float().mean()),
            "eval_pair_accuracy": pair_accuracy(engine, tokenizer, evals, cfg.micro_batch_size * 2) if evals else None,
        }
        out = Path(cfg.out)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        eng.save_pretrained(tmp)  # collective: every rank gathers (ZeRO-3), rank 0 writes
        if rank == 0:
            tokenizer.save_pretrained(str(tmp))
            (tmp / "rm_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
            (tmp / "rm_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
            mark_output(tmp, COMMAND)
            replace_dir(tmp, out)  # an existing out was checked by check_output (an earlier rlhf rm output)
        dist.barrier()
        return out
    finally:
        if eng is not None:
            eng.destroy(group=started)  # also drops DeepSpeed's cached groups
        elif started:
            dist.destroy_process_group()


def read_stats(path: str | Path) -> dict:
    """The ``rm_stats.json`` a reward model was saved with (mean, std, pair accuracies)."""
    return json.loads((Path(path) / "rm_stats.json").read_text())
