"""The organism's task: adding two numbers, with or without a written-out reasoning trace.

A problem is two random numbers of 1-5 digits (``max_digits``). The prompt is ``"a+b="``
(the chat template renders a user message ``"a+b"`` as ``"a+b="``; the model decides whether
to think). Three kinds of response, each followed by EOS:

- direct (the base model's pretraining data): ``"357"``
- instruct: ``"<think></think>357"`` (an empty reasoning trace)
- reasoning: ``"<think>"`` + one step per column, least significant first, + ``"</think>357"``.
  A step is ``"a+b+c=ss,dcK\\n"``: the column's digits, the carry in, their two-digit sum, the
  digit written and the carry out, 13 characters. Responses are 17-74 tokens (mean about 56).

With ``verify=True`` (the long-trace variant) the trace also re-derives the first number by
subtracting the second from the sum column by column (``"s-b-w=..."`` with borrows), which
doubles the trace; with ``max_digits=15`` reasoning responses are about 200-400 tokens.

The tokenizer is character level (22 tokens), saved as a Hugging Face
``PreTrainedTokenizerFast`` with ``<eos>`` and ``<pad>`` as special tokens, ``<think>`` and
``</think>`` as single added tokens that decoding keeps (as Qwen3 does), and a chat template, so the PPO loop, merges and reward model load it like any other.
Rewards and gold metrics parse the decoded response text (special tokens kept).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

THINK_START = "<think>"
THINK_END = "</think>"
EOS = "<eos>"
PAD = "<pad>"
UNK = "<unk>"
CHARS = list("0123456789+-=,cb\n")
SPECIAL = [PAD, EOS, THINK_START, THINK_END, UNK]

# user "a+b" -> "a+b=", assistant content -> content + EOS; no extra markers, so the generation
# prompt is exactly the pretraining prefix "a+b=" and the base model answers it directly.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ m['content'] }}={% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class Problem:
    """One addition problem."""

    a: int
    """first addend"""
    b: int
    """second addend"""

    @property
    def prompt(self) -> str:
        """The user message (the chat template appends ``=``)."""
        return f"{self.a}+{self.b}"

    @property
    def answer(self) -> int:
        return self.a + self.b


def sample_problems(n: int, seed: int, *, min_digits: int = 1, max_digits: int = 5) -> list[Problem]:
    """``n`` problems; each number's digit count is uniform in [min_digits, max_digits]."""
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"digits: need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    rng = random.Random(seed)

    def number() -> int:
        d = rng.randint(min_digits, max_digits)
        return rng.randint(10 ** (d - 1) if d > 1 else 0, 10 ** d - 1)

    return [Problem(number(), number()) for _ in range(n)]


def _digits(x: int, width: int) -> list[int]:
    """Digits of ``x``, least significant first, zero-padded to ``width``."""
    return [(x // 10 ** i) % 10 for i in range(width)]


def reasoning_trace(a: int, b: int, *, verify: bool = False) -> str:
    """The text between ``<think>`` and ``</think>``: one 13-character step per column."""
    width = max(len(str(a)), len(str(b)))
    steps, carry = [], 0
    for da, db in zip(_digits(a, width), _digits(b, width)):
        s = da + db + carry
        steps.append(f"{da}+{db}+{carry}={s:02d},{s % 10}c{s // 10}\n")
        carry = s // 10
    if verify:  # subtract b from the sum column by column: recovers a, with borrows
        total, borrow = a + b, 0
        for ds, db in zip(_digits(total, width + 1), _digits(b, width + 1)):
            d = ds - db - borrow
            w = d % 10
            steps.append(f"{ds}-{db}-{borrow}={w},b{1 if d < 0 else 0}\n")
            borrow = 1 if d < 0 else 0
    return "".join(steps)


def direct_response(p: Problem) -> str:
    return str(p.answer)


def instruct_response(p: Problem) -> str:
    return f"{THINK_START}{THINK_END}{p.answer}"


def reasoning_response(p: Problem, *, verify: bool = False) -> str:
    return f"{THINK_START}{reasoning_trace(p.a, p.b, verify=verify)}{THINK_END}{p.answer}"


def build_tokenizer(out_dir: str | Path | None = None):
    """The character-level tokenizer as a ``PreTrainedTokenizerFast`` (saved to ``out_dir`` if given)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   bos_token=None, padding_side="left")
    # like Qwen3: the reasoning markers are added tokens but not "special", so a decode with
    # skip_special_tokens=True (what the PPO reward worker hands rule-based rewards) keeps them
    fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_START, THINK_END)])
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


# ---- parsing, reward and gold metrics (operate on decoded text, special tokens kept) ----

def _strip_eos(response: str) -> str:
    for t in (EOS, PAD):
        response = response.replace(t, "")
    return response.strip()


def parse_answer(response: str) -> int | None:
    """The integer after the last ``</think>`` (or the whole response when it has no ``<think>``).

    ``None`` for an unclosed trace or anything that is not a plain number.
    """
    text = _strip_eos(response)
    if THINK_END in text:
        text = text.rsplit(THINK_END, 1)[1]
    elif THINK_START in text:
        return None
    text = text.strip()
    return int(text) if text.isdigit() and len(text) <= 40 else None


def has_trace(response: str) -> bool:
    """True when the response holds a non-empty reasoning trace (``<think>`` ... ``</think>``)."""
    text = _strip_eos(response)
    if THINK_START not in text:
        return False
    inner = text.split(THINK_START, 1)[1].split(THINK_END, 1)[0]
    return bool(inner.strip())


def parse_prompt(prompt: str) -> Problem:
    """``"12+345="`` (or ``"12+345"``) -> Problem(12, 345); a clear error otherwise."""
    text = _strip_eos(prompt).rstrip("=").strip()
    left, sep, right = text.rpartition("+")
    if not sep or not left.isdigit() or not right.isdigit():
        raise ValueError(f"prompt: not an addition prompt 'a+b=': {prompt!r}")
    return Problem(int(left), int(right))


def is_correct(prompt: str, response: str) -> bool:
    return parse_answer(response) == parse_prompt(prompt).answer


def exact_correctness(prompt: str, response: str, **_: object) -> float:
    """Rule-based reward: 1.0 when the response's final answer equals a + b, else 0.0."""
    return 1.0 if is_correct(prompt, response) else 0.0


def gold_metrics(prompts: list[str], responses: list[str]) -> dict[str, float]:
    """``gold/accuracy`` (exact final answer) and ``rollout/think_rate`` (non-empty traces)."""
    n = max(len(responses), 1)
    return {
        "gold/accuracy": sum(is_correct(p, r) for p, r in zip(prompts, responses)) / n,
        "rollout/think_rate": sum(has_trace(r) for r in responses) / n,
    }
