"""`rlhf sft`: config validation, data errors and chat-message prompts (no training here;
the end-to-end calibration test trains with it on DeepSpeed, full and LoRA)."""

from __future__ import annotations

import json

import pytest
import yaml

from rlhf import cli, sft


@pytest.fixture
def files(tmp_path, tiny_llama):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "response": "<think>\nx\n</think>\n\nhello"}) + "\n")
    return {"model": str(tiny_llama), "data": str(data), "out": str(tmp_path / "out")}


def test_config_errors_name_the_key(files):
    with pytest.raises(ValueError, match=r"sft.lora: unknown key\(s\) \['rank'\]"):
        sft.load_config({**files, "lora": {"rank": 4}})
    with pytest.raises(ValueError, match="sft.method: must be one of 'lora', 'full'"):
        sft.load_config({**files, "method": "qlora"})
    with pytest.raises(ValueError, match="sft.batch_size: 10 is not a multiple of micro_batch_size"):
        sft.load_config({**files, "batch_size": 10, "micro_batch_size": 4})
    with pytest.raises(ValueError, match="sft.data: file not found"):
        sft.load_config({**files, "data": files["data"] + ".missing"})


def test_lora_targets_must_exist(tiny_llama):
    model = sft.load_model(tiny_llama)
    with pytest.raises(ValueError, match=r"sft.lora.targets: model has no module named \['c_attn'\]"):
        sft.add_lora(model, sft.LoraSettings(targets=["q_proj", "c_attn"]))
    peft_model = sft.add_lora(model, sft.LoraSettings(r=2))
    trained = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trained == set(sft.LORA_TARGETS)


def test_missing_response_field_and_message_prompts(files, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"d.jsonl:1: record has no field 'answer'"):
        sft.read_jsonl(files["data"], ["prompt", "answer"], "sft.response_field")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    recs = [{"prompt": msgs, "response": "<think>\nx\n</think>\n\nhello"}]
    (ids, labels), = sft.build_examples(tokenizer, recs, sft.SFTConfig())[0]
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nbe brief<|im_end|>") and text.endswith("hello<|im_end|>")
    assert tokenizer.decode([t for t in labels if t != -100]) == "x\n</think>\n\nhello<|im_end|>"


def test_cli_error_is_one_line(files, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**files, "epochs": 0}))
    assert cli.main(["sft", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "rlhf sft: sft.epochs: must be >= 1, got 0"


@pytest.mark.slow
def test_output_is_owned_and_force_replaces_only_an_sft_output(files, tmp_path, capsys):
    """Issue 12 point 1: the output carries the `rlhf sft` marker; without --force an existing output
    is refused, with --force an earlier sft output is replaced, anything else is never touched."""
    from bairlhf.outputs import owner

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**files, "method": "full", "batch_size": 1, "micro_batch_size": 1, "max_len": 64}))
    assert cli.main(["sft", str(cfg)]) == 0
    out = tmp_path / "out"
    assert owner(out) == "rlhf sft" and (out / "model.safetensors").is_file()
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("rlhf sft: wrote the full checkpoint")
    assert cli.main(["sft", str(cfg)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    (out / "stale.txt").write_text("from the earlier run")
    assert cli.main(["sft", str(cfg), "--force"]) == 0
    assert owner(out) == "rlhf sft" and not (out / "stale.txt").exists()
    assert not list(tmp_path.glob(".out.*"))  # no temporaries or moved-aside copies left
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("not ours")
    assert cli.main(["sft", str(cfg), "--out", str(theirs), "--force"]) == 2
    assert "was not written by `rlhf sft`" in capsys.readouterr().err and (theirs / "keep.txt").is_file()
