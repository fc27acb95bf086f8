"""`rlhf rm`: the Bradley-Terry reward-model trainer (bad input before any work; a real DeepSpeed run)."""

import json

import pytest

from rlhf import rm
from rlhf.cli import rm as rm_cli


def _pairs(path, n=16, bad_line=None):
    rows = [{"prompt": f"what is {i} plus 1?", "chosen": f"{i + 1}", "rejected": f"{i + 2} maybe"} for i in range(n)]
    if bad_line is not None:
        del rows[bad_line]["rejected"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_config_is_refused_naming_the_key(tmp_path, tiny_llama):
    data = _pairs(tmp_path / "p.jsonl")
    base = {"model": str(tiny_llama), "data": str(data), "out": str(tmp_path / "out")}
    with pytest.raises(ValueError, match="unknown key 'lerning_rate'"):
        rm.config_from_dict({**base, "lerning_rate": 1})
    with pytest.raises(ValueError, match="missing required key 'data'"):
        rm.config_from_dict({k: v for k, v in base.items() if k != "data"})
    with pytest.raises(ValueError, match="eval_data: file not found"):
        rm.config_from_dict({**base, "eval_data": str(tmp_path / "nope.jsonl")})
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="exists"):
        rm.config_from_dict(base)
    with pytest.raises(ValueError, match=r"p2.jsonl:3: key 'rejected'"):
        rm.read_pairs(_pairs(tmp_path / "p2.jsonl", bad_line=2))


@pytest.mark.slow
def test_trains_and_records_score_stats(tmp_path, tiny_llama):
    data = _pairs(tmp_path / "p.jsonl")
    cfg_file = tmp_path / "rm.yaml"
    cfg_file.write_text(f"model: {tiny_llama}\ndata: {data}\neval_data: {data}\nout: {tmp_path / 'rm'}\n"
                        "lr: 1.0e-3\nbatch_size: 8\nmicro_batch_size: 4\nepochs: 2\n")
    assert rm_cli.main([str(cfg_file)]) == 0
    stats = rm.read_stats(tmp_path / "rm")
    assert stats["n"] == 32 and stats["std"] > 0 and stats["eval_pair_accuracy"] is not None
    assert not list(tmp_path.glob(".rm.tmp-*"))
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"))
    assert model.config.num_labels == 1
    with pytest.raises(rm.RMError, match="already exists"):  # refused without --force (the CLI: exit 2)
        rm_cli.main([str(cfg_file)])
    assert rm_cli.main([str(cfg_file), "--force"]) == 0  # --force replaces an earlier rlhf rm output
