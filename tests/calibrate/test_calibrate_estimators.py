"""Logit and prefix estimators on a tiny random model with the "emit" template (model opens <think>)."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf.calibrate import data as data_mod
from rlhf.calibrate import estimators as est
from rlhf.calibrate import load_config
from rlhf import sft, tiny


@pytest.fixture(scope="module")
def emit_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("emit")
    tok = tiny.train_tokenizer(template="emit")
    path = tiny.make_tiny_model(root / "m", tokenizer=tok, seed=3)
    inputs = ["What is 1 plus 2?", "Compute 12 plus 30 and then check it.", "hi"]
    (root / "train.jsonl").write_text("".join(json.dumps({"input": x, "output": "3"}) + "\n" for x in inputs))
    (root / "cal.jsonl").write_text("".join(json.dumps({"input": x}) + "\n" for x in inputs))
    cfg = load_config({"model": str(path), "train_data": str(root / "train.jsonl"),
                       "cal_data": str(root / "cal.jsonl")})
    model = sft.load_model(path).eval()
    _, cal = data_mod.load_records(cfg)
    prompts, paths = data_mod.calibration_prompts(tok, cal, cfg)
    return tok, model, prompts, paths


def test_logit_estimator_matches_step_by_step_probabilities(emit_world):
    tok, model, prompts, paths = emit_world
    assert len({len(p) for p in prompts}) == 3  # different lengths: padding is exercised
    batched = est.logit_rate(model, prompts, paths, pad_id=tok.pad_token_id, batch_size=3)
    single = est.logit_rate(model, prompts, paths, pad_id=tok.pad_token_id, batch_size=1)
    assert (batched.forward_calls, batched.forward_rows) == (1, 3)
    assert (single.forward_calls, single.forward_rows) == (3, 3)
    assert batched.per_prompt == pytest.approx(single.per_prompt, abs=1e-6)
    for prompt, path, got in zip(prompts, paths, batched.per_prompt):
        assert not path.prefilled
        ctx, probs = list(prompt), []
        with torch.no_grad():
            for t in path.ids:  # teacher-force the empty path one token at a time
                probs.append(torch.softmax(model(input_ids=torch.tensor([ctx])).logits[0, -1], -1)[t].item())
                ctx.append(t)
        p_open = probs[0]
        p_empty = float(torch.tensor(probs[1:]).prod())
        assert got == pytest.approx(p_open * (1 - p_empty), rel=1e-4, abs=1e-9)
    assert batched.rho == pytest.approx(sum(batched.per_prompt) / 3)
    assert batched.rho_count == sum(p > 0.5 for p in batched.per_prompt) / 3


def test_prefix_estimator_greedy_and_sampled(emit_world):
    tok, model, prompts, paths = emit_world
    ws = est.whitespace_token_ids(tok)
    kw = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, whitespace_ids=ws, max_new_tokens=4, batch_size=3)
    greedy = est.sample_rate(model, prompts, paths, temperature=0.0, samples=5, **kw)
    assert set(greedy.per_prompt) <= {0.0, 1.0} and greedy.forward_calls <= 4 and greedy.generated_tokens <= 12
    # the random model almost never opens a block: both estimators say "no reasoning"
    sampled = est.sample_rate(model, prompts, paths, temperature=1.0, samples=4, seed=1, **kw)
    logit = est.logit_rate(model, prompts, paths, pad_id=tok.pad_token_id)
    assert abs(sampled.rho - logit.rho) <= 0.1
    assert sampled.forward_rows == sampled.forward_calls * 12  # 3 prompts x 4 samples per call
