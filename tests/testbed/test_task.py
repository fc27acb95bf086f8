"""The addition task: formats, tokenizer, parsing, rewards and gold metrics (pure Python, fast)."""

import statistics

import pytest

from rlhf.testbed import rewards, task


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    task.build_tokenizer(d)
    return AutoTokenizer.from_pretrained(str(d))


def test_reasoning_trace_is_column_by_column_with_carries():
    p = task.Problem(12, 999)
    assert task.reasoning_response(p) == "<think>2+9+0=11,1c1\n1+9+1=11,1c1\n0+9+1=10,0c1\n</think>1011"
    assert task.instruct_response(p) == "<think></think>1011"
    assert task.direct_response(p) == "1011"


def test_lengths_match_the_prototype(tok):
    lens = [len(tok.encode(task.reasoning_response(p), add_special_tokens=False)) + 1
            for p in task.sample_problems(1000, 0)]
    assert min(lens) == 17 and max(lens) == 74 and 50 < statistics.mean(lens) < 60
    long = [len(tok.encode(task.reasoning_response(p, verify=True), add_special_tokens=False))
            for p in task.sample_problems(200, 0, min_digits=8, max_digits=15)]
    assert 200 <= min(long) and max(long) <= 400


def test_verification_pass_recovers_the_first_addend():
    a, b = 90071, 8765
    trace = task.reasoning_trace(a, b, verify=True).splitlines()
    written = [int(line.split("=")[1].split(",")[0]) for line in trace if "-" in line]
    assert int("".join(map(str, reversed(written)))) == a


def test_tokenizer_is_character_level_and_keeps_think_markers(tok):
    text = "12+345=" + task.reasoning_response(task.Problem(12, 345))
    ids = tok.encode(text + tok.eos_token, add_special_tokens=False)
    assert len(tok) == 22 and len(ids) == len(text) - 2 * 6 - 1 + 1  # markers are one token each
    assert tok.decode(ids, skip_special_tokens=True) == text  # EOS dropped, markers kept
    assert tok.apply_chat_template([{"role": "user", "content": "12+345"}], tokenize=False,
                                   add_generation_prompt=True) == "12+345="
    assert tok.pad_token == "<pad>" and tok.eos_token == "<eos>"


def test_parsing_and_rewards():
    p = "12+345="
    assert task.parse_prompt(p) == task.Problem(12, 345)
    assert task.parse_answer("<think>x\n</think>357") == 357
    assert task.parse_answer("<think></think>357") == 357
    assert task.parse_answer("357") == 357
    assert task.parse_answer("<think>2+5") is None and task.parse_answer("35a") is None
    assert task.has_trace("<think>2+5+0=07,7c0\n</think>357") and not task.has_trace("<think></think>357")
    responses = ["<think>2+5+0=07,7c0\n</think>357", "<think></think>357", "358", "<think>2+5"]
    assert rewards.exact([p] * 4, responses, [True] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert rewards.exact([p], responses[:1], [False]) == [0.0]  # truncated: no credit
    g = rewards.gold([p] * 4, responses, [True] * 4)
    assert g == {"gold/accuracy": 0.5, "rollout/think_rate": 0.5}
    with pytest.raises(ValueError, match="prompt"):
        task.parse_prompt("hello")


def test_wrong_answers_are_wrong():
    import random

    from rlhf.testbed.build import _wrong_answer

    rng = random.Random(0)
    for p in task.sample_problems(300, 3):
        assert _wrong_answer(p, rng) != p.answer
