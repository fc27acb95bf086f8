"""The transformers-generate rollout engine: sampling logprobs equal the trainer's, seeded, weight updates."""

from __future__ import annotations

import torch

from rlhf.algo import logprobs_from_logits
from rlhf.engines.base import SamplingParams
from rlhf.engines.hf_rollout import HFRolloutEngine
from rlhf.workers.batch import collate
from rlhf.workers.model_workers import policy_logits


def _engine(path, tok):
    return HFRolloutEngine(str(path), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)


def _prompts(tok):
    texts = ["Question: what is 1 plus 2?", "hi", "Let me think step by step about this problem."]
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
            for t in texts]


def test_logprobs_match_trainer_forward_with_left_padding(tiny_llama, tokenizer):
    eng = _engine(tiny_llama, tokenizer)
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in _prompts(tokenizer)]
    assert len({len(p) for p in prompts}) > 1  # rows really are padded differently
    for temp in (1.0, 0.7):
        gens = eng.generate(prompts, SamplingParams(max_new_tokens=10, temperature=temp, seed=3))
        batch = collate(gens, tokenizer.pad_token_id)
        with torch.no_grad():
            logp = logprobs_from_logits(policy_logits(eng.model, batch, temp), batch.responses)
        diff = (logp - batch.rollout_logp).abs() * batch.mask
        assert diff.max() < 1e-4, diff.max()
        for g in gens:
            assert len(g.response_ids) == len(g.logprobs) >= 1
            assert g.finished == (g.response_ids[-1] == tokenizer.eos_token_id)
            assert tokenizer.pad_token_id not in g.response_ids


def test_seeded_sampling_repeats(tiny_llama, tokenizer):
    eng = _engine(tiny_llama, tokenizer)
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in _prompts(tokenizer)]
    a = eng.generate(prompts, SamplingParams(max_new_tokens=8, seed=11))
    b = eng.generate(prompts, SamplingParams(max_new_tokens=8, seed=11))
    assert [g.response_ids for g in a] == [g.response_ids for g in b]


def test_update_weights_changes_the_policy(tiny_llama, tiny_family, tokenizer):
    eng = _engine(tiny_llama, tokenizer)
    other = _engine(tiny_family["sft_a"], tokenizer)
    eng.update_weights((n, p.detach().clone()) for n, p in other.model.named_parameters())
    for (n, p), (_, q) in zip(eng.model.named_parameters(), other.model.named_parameters()):
        assert torch.equal(p, q), n


def test_top_k_top_p_logprobs_match_the_filtered_trainer_distribution(tiny_llama, tokenizer):
    from rlhf.workers.model_workers import filter_logits

    eng = _engine(tiny_llama, tokenizer)
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in _prompts(tokenizer)]
    for k, p in ((20, 1.0), (0, 0.8), (50, 0.9)):
        gens = eng.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.8, top_k=k, top_p=p, seed=5))
        batch = collate(gens, tokenizer.pad_token_id)
        with torch.no_grad():
            logits = policy_logits(eng.model, batch, 0.8)
            filtered = logprobs_from_logits(filter_logits(logits, k, p), batch.responses)
            plain = logprobs_from_logits(logits, batch.responses)
        m = batch.mask
        assert ((filtered - batch.rollout_logp).abs() * m).max() < 1e-4, (k, p)
        assert ((plain - batch.rollout_logp).abs() * m).max() > 1e-3  # the trap: unfiltered logprobs differ
