"""``perf/mfu*``: model FLOPs per phase and utilisation, against hand-computed numbers."""

from __future__ import annotations

import pytest

from rlhf.metrics.perf import mfu_metrics, model_shape, step_flops

# hidden 4, 2 layers, 2 heads of 2, 1 KV head, MLP 8, vocab 10:
# per layer 2*4*2*2 (q, o) + 2*4*1*2 (k, v) + 3*4*8 (MLP) = 32 + 16 + 96 = 144; trunk 288
CFG = {"hidden_size": 4, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
       "intermediate_size": 8, "vocab_size": 10}


def test_model_shape_and_forward_flops():
    lm, score = model_shape(CFG, "lm"), model_shape(CFG, "score")
    assert (lm.matmul_params, lm.layers, lm.attn_width) == (288 + 40, 2, 4)
    assert score.matmul_params == 288 + 4
    assert lm.forward_flops(5) == 2 * 328 + 2 * 2 * 4 * 5 == 736
    with pytest.raises(KeyError, match="intermediate_size"):
        model_shape({k: v for k, v in CFG.items() if k != "intermediate_size"}, "lm")


def test_step_flops_and_mfu():
    lm, score = model_shape(CFG, "lm"), model_shape(CFG, "score")
    # 2 rows, 6 prompt + 4 response tokens: mean sequence 5; policy 736 / token, critic and reward 664
    f = step_flops(lm, score, score, prompt_tokens=6, response_tokens=4, rows=2, epochs=2)
    assert f == {"generate": 7360.0, "score": 2 * 7360 + 6640 + 6640, "train": 3 * 2 * (7360 + 6640)}
    critic_free = step_flops(lm, None, None, 6, 4, 2, 1, actor_scores=False)
    assert critic_free == {"generate": 7360.0, "score": 7360.0, "train": 3 * 7360.0}
    assert step_flops(lm, score, None, 6, 4, 2, 1, actor_trains=False)["train"] == 3 * 6640.0
    m = mfu_metrics(f, {"generate": 1.0, "score": 2.0, "train": 4.0, "step": 8.0}, peak_tflops=1e-7)  # 1e5 FLOP/s
    assert m["perf/mfu"] == pytest.approx((7360 + 28000 + 84000) / 8 / 1e5)
    assert m["perf/mfu_generate"] == pytest.approx(0.0736)
    assert m["perf/mfu_score"] == pytest.approx(0.14)
    assert m["perf/mfu_train"] == pytest.approx(0.21)
    assert m["perf/model_tflops"] == pytest.approx(119360 / 8 / 1e12)
    assert set(mfu_metrics(f, {"step": 8.0}, None)) == {"perf/model_tflops"}  # no peak: no MFU
