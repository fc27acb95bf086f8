"""Tiny Hugging Face models and a tokenizer built on the spot (tests, demos, benchmarks).

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a small built-in corpus
(or one you pass), with the reasoning markers ``<think>`` / ``</think>`` and chat markers as
special tokens and a chat template. Two template styles exist because reasoning models differ
in where the "think or not" decision happens:

- ``"prefill"``: the generation prompt already ends with ``<think>\\n`` (DeepSeek-R1, QwQ,
  Qwen3-Thinking-2507); the model's first token decides (``</think>`` means an empty trace).
- ``"emit"``: the generation prompt ends after ``<|im_start|>assistant\\n``; the model emits
  ``<think>`` itself (Qwen3 hybrid style) and decides after it.

Models are tiny Llama or Qwen2 configurations saved as sharded safetensors with an index, so
every part of the stack (merges, PPO, vLLM) loads them exactly as it loads real checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

THINK_START = "<think>"
THINK_END = "</think>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", THINK_START, THINK_END, "<pad>"]

_TEMPLATE_HEAD = (
    "{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
)
CHAT_TEMPLATES = {
    "prefill": _TEMPLATE_HEAD + "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}",
    "emit": _TEMPLATE_HEAD + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
}

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is 12 plus 30? Answer: 42.",
    "Let me think step by step about this problem before answering.",
    "<think>\nFirst add the ones, then carry the tens.\n</think>\nThe answer is 7.",
    "user assistant system reasoning answer question solve compute verify check",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) . , ; : ! ?",
    "A policy is trained with proximal policy optimization against a reward model.",
    "Merging weights of a base model and a fine-tuned model gives a balanced initialization.",
]


def train_tokenizer(out_dir: str | Path | None = None, *, corpus: list[str] | None = None,
                    vocab_size: int = 384, template: str = "prefill"):
    """Train a byte-level BPE tokenizer with reasoning and chat special tokens.

    Returns a ``transformers.PreTrainedTokenizerFast``; saves it to ``out_dir`` when given.
    ``template`` picks one of ``CHAT_TEMPLATES`` ("prefill" or "emit").
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if template not in CHAT_TEMPLATES:
        raise ValueError(f"template: unknown chat template style {template!r}; use one of {sorted(CHAT_TEMPLATES)}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((corpus or _CORPUS) * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                   bos_token=None, unk_token=None)
    fast.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", THINK_START, THINK_END]})
    fast.chat_template = CHAT_TEMPLATES[template]
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def tiny_config(arch: str = "llama", *, vocab_size: int = 384, hidden_size: int = 64, num_layers: int = 2,
                num_heads: int = 2, num_kv_heads: int | None = None, intermediate_size: int | None = None,
                tie_word_embeddings: bool = False, max_position_embeddings: int = 512,
                eos_token_id: int | None = None, pad_token_id: int | None = None):
    """A transformers config for a tiny Llama or Qwen2 (head_dim = hidden/heads; keep it >= 32 for vLLM)."""
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}.get(arch)
    if cls is None:
        raise ValueError(f"arch: unknown tiny architecture {arch!r}; use 'llama' or 'qwen2'")
    return cls(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
               num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
               intermediate_size=intermediate_size or 2 * hidden_size,
               max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
               eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=None)


def make_tiny_model(out_dir: str | Path, *, arch: str = "llama", tokenizer=None, seed: int = 0,
                    max_shard_size: str | int = "40KB", dtype: str = "float32", **config_kwargs):
    """Build a randomly initialised tiny causal LM and save it as sharded safetensors with an index.

    ``tokenizer`` (from ``train_tokenizer``) sets the vocabulary and special ids and is saved beside
    the weights; without one a fresh tokenizer is trained. Returns ``out_dir`` as a ``Path``.
    A small ``max_shard_size`` makes even a tiny model span several shards with an index.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    tok = tokenizer if tokenizer is not None else train_tokenizer()
    cfg = tiny_config(arch, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model = model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               bos_token_id=None)
    model.save_pretrained(str(out), max_shard_size=max_shard_size, safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def perturbed_copy(src: str | Path, out_dir: str | Path, *, scale: float = 0.02, seed: int = 1,
                   max_shard_size: str | int = "40KB"):
    """Load ``src``, add Gaussian noise of std ``scale`` to every weight, save to ``out_dir``.

    Gives "fine-tuned" relatives of a base model with identical names, shapes and config, the
    inputs a merge needs.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(src))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale)
    model.save_pretrained(str(out_dir), max_shard_size=max_shard_size, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out_dir))
    return Path(out_dir)


def shard_index(path: str | Path) -> dict:
    """The ``model.safetensors.index.json`` of a saved checkpoint (raises if it is not sharded)."""
    return json.loads((Path(path) / "model.safetensors.index.json").read_text())
