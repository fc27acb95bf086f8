"""Calibration data: prompts, the empty-trace serialization (equation 3) and the decision path.

SFT target for an (input, output) pair: ``y(o) = serial(epsilon, o)`` is the chat template's
empty reasoning trace followed by the output, i.e. the text ``reasoning.empty_trace + output``
after the generation prompt. It is tokenized **after** the template's own prefill
(``rlhf.sft.tokenize_example``): with a template that prefills ``<think>\\n`` the response
tokens are those of ``\\n</think>\\n\\n`` + output (the model never generates the prefill);
with a template where the model emits ``<think>`` itself they start with ``<think>``.

Decision point (where "reason or not" is decided), per template style:

- prefill (R1, QwQ, Qwen3-Thinking-2507, OLMo-3-Think): the first generated token(s) after the
  prefilled ``<think>``; the empty path is the rest of the empty trace up to ``</think>``.
- emit (Qwen3 hybrid): the model first emits ``<think>`` (the "open" part), then decides at
  the next token(s); the empty path is ``<think>`` + whitespace + ``</think>``.

``DecisionPath`` splits the empty-trace tokens into ``open_ids`` (through the start marker;
empty when prefilled) and ``close_ids`` (after it, through the end marker).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bairlhf.jsonl import read_jsonl
from rlhf.sft import prompt_messages, render_prompt, tokenize_example

from .config import CalibrateConfig, CalibrateError


@dataclass(frozen=True)
class DecisionPath:
    """The empty-trace token path that follows the generation prompt."""

    open_ids: tuple[int, ...]
    """Tokens up to and including the reasoning-start marker (empty when the template prefills it)."""
    close_ids: tuple[int, ...]
    """Tokens after the start marker up to and including the end-of-reasoning marker."""
    start_id: int
    """Token id of the reasoning-start marker."""
    end_id: int
    """Token id of the end-of-reasoning marker."""

    @property
    def prefilled(self) -> bool:
        """True when the generation prompt already opens the reasoning block."""
        return not self.open_ids

    @property
    def ids(self) -> tuple[int, ...]:
        """The whole empty path."""
        return self.open_ids + self.close_ids


def marker_id(tokenizer, marker: str, key: str) -> int:
    """The single token id of a reasoning marker; ``CalibrateError`` naming ``key`` otherwise."""
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or marker not in tokenizer.get_vocab():
        raise CalibrateError(f"{key}: tokenizer has no reasoning marker {marker!r} as a single token "
                         f"(it encodes to {len(ids)} tokens); set {key} to the model's marker")
    return ids[0]


def build_messages(record: dict, cfg: CalibrateConfig) -> list[dict]:
    """Chat messages for one record: the prompt template filled with the input field."""
    value = record[cfg.input_field]
    if not isinstance(value, str):
        raise CalibrateError(f"field {cfg.input_field!r} must be a string, got {type(value).__name__}")
    return prompt_messages(cfg.prompt_template.replace("{input}", value), cfg.system_prompt)


def serialize_empty_trace(output: str, cfg: CalibrateConfig) -> str:
    """``serial(epsilon, o)``: the empty reasoning trace followed by the output."""
    return cfg.reasoning.empty_trace + output


def sft_records(records: list[dict], cfg: CalibrateConfig) -> list[dict]:
    """Training records for ``rlhf.sft``: ``{"messages": [...], "response": empty_trace + output}``."""
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec[cfg.output_field], str):
            raise CalibrateError(f"{cfg.train_data}: record {i}: field {cfg.output_field!r} must be a string")
        out.append({"messages": build_messages(rec, cfg),
                    "response": serialize_empty_trace(rec[cfg.output_field], cfg)})
    return out


def read_records(path: str | Path, fields: list[str], key: str) -> list[dict]:
    """Read a JSONL file of records, each a JSON object whose ``fields`` are non-empty strings.

    Blank lines are skipped. Raises ``CalibrateError`` naming ``path:line`` (and the field, and
    ``key``, the config key that names the field) on: text that is not UTF-8, a line that is not
    JSON or not an object, a missing, non-string or empty field; and on a file with no records.
    """
    return read_jsonl(path, "records", required_fields=fields, nonempty=True, set_by=key,
                      error=CalibrateError)

def load_records(cfg: CalibrateConfig) -> tuple[list[dict], list[dict]]:
    """Read training and calibration JSONL (``read_records``); errors name file, line and field."""
    train = read_records(cfg.train_data, [cfg.input_field, cfg.output_field], "config.input_field/output_field")
    cal = read_records(cfg.cal_data, [cfg.input_field], "config.input_field")
    if cfg.estimator.max_prompts:
        cal = cal[: int(cfg.estimator.max_prompts)]
    return train, cal


def decision_path(tokenizer, messages: list[dict], cfg: CalibrateConfig) -> DecisionPath:
    """Tokens of the empty path after this prompt, cut after the end-of-reasoning marker.

    Uses the same tokenization as SFT, so the logit estimator scores exactly the path the SFT
    step trained on.
    """
    start_id = marker_id(tokenizer, cfg.reasoning.start, "reasoning.start")
    end_id = marker_id(tokenizer, cfg.reasoning.end, "reasoning.end")
    _, resp = tokenize_example(tokenizer, messages, cfg.reasoning.empty_trace, cfg.reasoning.start)
    if end_id not in resp:
        raise CalibrateError(f"reasoning.empty_trace: {cfg.reasoning.empty_trace!r} does not tokenize to a path "
                         f"that contains the end marker {cfg.reasoning.end!r}")
    path = resp[: resp.index(end_id) + 1]
    if start_id in path:
        cut = path.index(start_id) + 1
        return DecisionPath(tuple(path[:cut]), tuple(path[cut:]), start_id, end_id)
    return DecisionPath((), tuple(path), start_id, end_id)


def calibration_prompts(tokenizer, records: list[dict], cfg: CalibrateConfig) -> tuple[list[list[int]], list[DecisionPath]]:
    """Prompt token ids (chat template + generation prompt) and the decision path of each record."""
    prompts, paths = [], []
    for rec in records:
        msgs = build_messages(rec, cfg)
        prompts.append(tokenizer(render_prompt(tokenizer, msgs), add_special_tokens=False)["input_ids"])
        paths.append(decision_path(tokenizer, msgs, cfg))
    return prompts, paths
