"""Empty-trace serialization after the template's prefill, decision paths, response-only labels."""

from __future__ import annotations

import json

import pytest

from rlhf.calibrate import data as data_mod
from rlhf.calibrate.config import load_config
from rlhf.calibrate.estimators import classify, whitespace_token_ids
from rlhf import sft, tiny


@pytest.fixture(scope="module")
def toks():
    return {style: tiny.train_tokenizer(template=style) for style in ("prefill", "emit")}


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture
def cfg(tmp_path, tiny_llama):
    (tmp_path / "train.jsonl").write_text(json.dumps({"input": "What is 3 plus 4?", "output": "7"}) + "\n")
    (tmp_path / "cal.jsonl").write_text(json.dumps({"input": "What is 1 plus 1?"}) + "\n")
    return load_config({"model": str(tiny_llama), "train_data": str(tmp_path / "train.jsonl"),
                        "cal_data": str(tmp_path / "cal.jsonl")})


def test_prefill_template_target_continues_after_prefill(toks, cfg):
    tok = toks["prefill"]
    rec = data_mod.sft_records([{"input": "What is 3 plus 4?", "output": "7"}], cfg)[0]
    assert rec["response"] == "<think>\n\n</think>\n\n7"
    prompt_ids, resp_ids = sft.tokenize_example(tok, rec["messages"], rec["response"])
    prompt_text = tok.apply_chat_template(rec["messages"], tokenize=False, add_generation_prompt=True)
    assert prompt_text.endswith("<|im_start|>assistant\n<think>\n")
    assert prompt_ids == _ids(tok, prompt_text)
    # the model never generates the prefill: the target starts with "\n</think>", tokenized on its own
    assert resp_ids == _ids(tok, "\n</think>\n\n7") + [tok.eos_token_id]
    assert tok.decode(prompt_ids + resp_ids) == prompt_text + "\n</think>\n\n7<|im_end|>"
    path = data_mod.decision_path(tok, rec["messages"], cfg)
    assert path.prefilled and path.open_ids == ()
    assert list(path.close_ids) == _ids(tok, "\n</think>")
    assert path.close_ids[-1] == tok.convert_tokens_to_ids("</think>")


def test_emit_template_target_starts_with_think(toks, cfg):
    tok = toks["emit"]
    rec = data_mod.sft_records([{"input": "What is 3 plus 4?", "output": "7"}], cfg)[0]
    prompt_ids, resp_ids = sft.tokenize_example(tok, rec["messages"], rec["response"])
    assert tok.apply_chat_template(rec["messages"], tokenize=False, add_generation_prompt=True).endswith("assistant\n")
    assert resp_ids == _ids(tok, "<think>\n\n</think>\n\n7") + [tok.eos_token_id]
    path = data_mod.decision_path(tok, rec["messages"], cfg)
    assert not path.prefilled
    assert path.open_ids == (tok.convert_tokens_to_ids("<think>"),)
    assert list(path.close_ids) == _ids(tok, "\n\n</think>")


def test_labels_only_on_response_tokens(toks):
    tok = toks["prefill"]
    c = sft.SFTConfig(max_len=512)
    recs = [{"prompt": "What is 3 plus 4?", "response": "<think>\n3+4=7\n</think>\n\n7"}]
    (ids, labels), = sft.build_examples(tok, recs, c)[0]
    p, r = sft.tokenize_example(tok, [{"role": "user", "content": "What is 3 plus 4?"}], recs[0]["response"])
    assert ids == p + r and labels == [-100] * len(p) + r
    with pytest.raises(ValueError, match="all 1 records are longer than 5"):
        sft.build_examples(tok, recs, sft.SFTConfig(max_len=5))


def test_response_that_ignores_the_prefill_is_an_error(toks):
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="already prefilled"):
        sft.tokenize_example(toks["prefill"], msgs, "<think></think>hello")
    with pytest.raises(ValueError, match="does not continue it"):
        sft.tokenize_example(toks["prefill"], msgs, "hello")
    # no reasoning marker configured: a plain response is accepted as is
    assert sft.tokenize_example(toks["prefill"], msgs, "hello", reasoning_start=None)[1][-1] == toks["prefill"].eos_token_id


def test_tokenizer_without_marker_is_rejected(toks):
    with pytest.raises(ValueError, match=r"reasoning.start: tokenizer has no reasoning marker '<reason>'"):
        data_mod.marker_id(toks["prefill"], "<reason>", "reasoning.start")


def test_classify_prefix(toks):
    tok = toks["emit"]
    ws = whitespace_token_ids(tok)
    start, end = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    path = data_mod.DecisionPath((start,), tuple(_ids(tok, "\n\n</think>")), start, end)
    assert not classify(_ids(tok, "<think>\n\n</think>\n\n7"), path, ws)        # empty trace
    assert classify(_ids(tok, "<think>\n3+4"), path, ws)                        # content before the window ends
    assert not classify(_ids(tok, "7"), path, ws)                               # no block at all
    assert classify(_ids(tok, "<think>\n3+4=7\n</think>"), path, ws)
    prefilled = data_mod.DecisionPath((), tuple(_ids(tok, "\n</think>")), start, end)
    assert not classify(_ids(tok, "\n</think>\n\n7"), prefilled, ws)
    assert classify(_ids(tok, "3+4=7\n</think>"), prefilled, ws)
