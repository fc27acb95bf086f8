import torch
from transformers import AutoModelForCausalLM

from rlhf import tiny


def test_tokenizer_has_reasoning_markers_and_template(tokenizer):
    for t in (tiny.THINK_START, tiny.THINK_END):
        ids = tokenizer.encode(t, add_special_tokens=False)
        assert len(ids) == 1, t
    text = tokenizer.apply_chat_template([{"role": "user", "content": "1+1?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    assert tokenizer.decode(tokenizer.encode("hello 12+30", add_special_tokens=False)) == "hello 12+30"


def test_tiny_models_are_sharded_and_load(tiny_llama, tiny_qwen2_tied):
    for path, tied in ((tiny_llama, False), (tiny_qwen2_tied, True)):
        idx = tiny.shard_index(path)
        assert len(set(idx["weight_map"].values())) > 1
        assert ("lm_head.weight" in idx["weight_map"]) == (not tied)
        model = AutoModelForCausalLM.from_pretrained(str(path))
        assert model.config.hidden_size // model.config.num_attention_heads >= 32  # vLLM needs head_dim >= 32
        out = model(torch.tensor([[1, 2, 3]]))
        assert out.logits.shape[-1] == model.config.vocab_size
