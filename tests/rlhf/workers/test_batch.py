"""The batch layout and mini-batch plans (fast, no Ray): the known PPO bookkeeping traps."""

from __future__ import annotations

import pytest
import torch

from rlhf.algo import gae, token_rewards
from rlhf.config import load_config
from rlhf.engines.base import Generation
from rlhf.workers.batch import make_plans
from rlhf.workers.batch import collate

PAD, EOS = 0, 9


def _gens():
    return [Generation([5, 6, 7], [11, 12, EOS], [-1.0, -2.0, -3.0], True),
            Generation([5], [13, 14, 15, 16], [-1.0, -1.0, -1.0, -1.0], False),
            Generation([5, 6], [EOS], [-0.5], True)]


def test_collate_aligns_responses_and_masks():
    b = collate(_gens(), PAD)
    P, T = b.prompt_len, b.mask.shape[1]
    assert (P, T) == (3, 4)
    assert b.mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert b.responses[0].tolist() == [11, 12, EOS, PAD]
    # left-padded prompts: positions count real tokens only (as generate does)
    assert b.position_ids[1].tolist()[:4] == [0, 0, 0, 1]
    assert b.attention_mask[2].tolist() == [0, 1, 1, 1, 0, 0, 0]
    # the model output at column P-1+t predicts response token t
    cols = torch.arange(P + T)[None, :, None].expand(3, -1, 1)
    pred_cols = b.response_slice(cols)[..., 0]
    assert pred_cols[0].tolist() == [2, 3, 4, 5]
    assert (b.input_ids.gather(1, pred_cols + 1) == b.responses).all()
    assert b.rollout_logp[0].tolist() == [-1.0, -2.0, -3.0, 0.0]


def test_reward_lands_on_eos_not_on_padding_and_values_are_unshifted():
    b = collate(_gens(), PAD)
    scores = torch.tensor([1.0, 2.0, 3.0])
    zeros = torch.zeros_like(b.mask)
    rewards, _ = token_rewards(scores, zeros, zeros, b.mask, kl_coef=0.1)
    assert rewards.tolist() == [[0, 0, 1.0, 0], [0, 0, 0, 2.0], [3.0, 0, 0, 0]]
    eos_pos = (b.responses == EOS).float().argmax(1)
    assert rewards[0, eos_pos[0]] == 1.0 and rewards[2, eos_pos[2]] == 3.0
    # gamma = lam = 1, V = 0: every response token's advantage is the score; padding stays 0
    adv, ret = gae(rewards, zeros, b.mask, gamma=1.0, lam=1.0)
    assert adv.tolist() == [[1, 1, 1, 0], [2, 2, 2, 2], [3, 0, 0, 0]]


def test_plans_cover_every_row_once_per_epoch_for_any_dp_layout():
    cfg = load_config(None, ["ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "ppo.micro_batch_size=2",
                             "ppo.ppo_epochs=2"])
    mask = torch.tensor([[1.0] * (i + 1) + [0.0] * (7 - i) for i in range(8)])
    one = make_plans(cfg, step=3, mask=mask, world=1)
    two = make_plans(cfg, step=3, mask=mask, world=2)
    assert len(one) == 1 and len(two) == 2
    for epoch in range(2):
        rows1 = [r for rows, _ in one[0][epoch] for r in rows]
        assert sorted(rows1) == list(range(8))
        for j, (rows, ntok) in enumerate(one[0][epoch]):
            assert ntok == float(mask[rows].sum())  # the GLOBAL mini-batch token count
            assert two[0][epoch][j][0] + two[1][epoch][j][0] == rows
            assert two[0][epoch][j][1] == two[1][epoch][j][1] == ntok
    assert make_plans(cfg, step=3, mask=mask, world=1) == one  # seeded by (seed, step, epoch)
    assert make_plans(cfg, step=4, mask=mask, world=1) != one


def test_select_rows_keeps_scalars():
    b = collate(_gens(), PAD)
    sub = b.select_rows([2, 0])
    assert sub.prompt_len == b.prompt_len and sub.mask.tolist() == [b.mask[2].tolist(), b.mask[0].tolist()]


def test_reward_model_score_is_read_at_eos_like_hf(tiny_llama, tokenizer):
    from transformers import AutoModelForSequenceClassification

    from rlhf.workers.model_workers import reward_model_scores

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(str(tiny_llama), num_labels=1).eval()
    eos = tokenizer.eos_token_id
    gens = [Generation([5, 6, 7], [11, 12, eos], [0.0] * 3, True), Generation([5], [13, 14, 15, 16], [0.0] * 4, False)]
    with torch.no_grad():
        got = reward_model_scores(rm, collate(gens, tokenizer.pad_token_id))
        want = [rm(input_ids=torch.tensor([g.prompt_ids + g.response_ids])).logits[0, 0].item() for g in gens]
    assert got.tolist() == pytest.approx(want, abs=1e-5)
