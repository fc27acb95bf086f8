"""ZeRO-3 saves with 2 ranks (issue 13): ``rlhf rm`` and ``rlhf sft`` on two gloo processes finish,
write a checkpoint that loads with full (unpartitioned) shapes and finite values, and equal a one-rank
ZeRO-0 run of the same seed and data (one example per micro-batch, so both average the same per-example
losses over the same examples per optimizer step)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rlhf import sft

pytestmark = pytest.mark.slow

HANG_S = 600
"""Only guards against a deadlock (the runs take seconds)."""

_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _launch(args: list[str], world: int, logs: Path) -> None:
    """``python -m rlhf.cli ARGS`` on ``world`` ranks (RANK / WORLD_SIZE / MASTER_* as a launcher sets
    them; gloo on CPU); fails the test on a non-zero exit or a hang, with the ranks' output."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    procs, files = [], []
    for rank in range(world):
        env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        files.append(logs.with_name(f"{logs.name}.rank{rank}.log"))
        with open(files[-1], "w") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "rlhf.cli", *args], env=env, stdout=out,
                                          stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=HANG_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"rlhf {args[0]} on {world} ranks did not finish (deadlock?):\n"
                    + "\n".join(f.read_text()[-2000:] for f in files))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, f in zip(procs, files):
        assert p.returncode == 0, f"{f.name}: exit {p.returncode}\n{f.read_text()[-4000:]}"


def _config(path: Path, **kw) -> Path:
    path.write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in kw.items()}))
    return path


def _check_close(got: dict, want: dict, init: dict, what: str) -> None:
    """Same names and full shapes as ``init``, finite, and the same update from ``init``: per tensor
    ``|got - want| <= 1e-3 |want - init|`` (2-norms; AdamW's steps on near-zero gradients amplify
    rounding differences of single elements, so no elementwise bound)."""
    assert set(got) == set(want) == set(init), what
    for k, v in got.items():
        assert tuple(v.shape) == tuple(init[k].shape), (what, k, v.shape)
        assert bool(torch.isfinite(v).all()), (what, k)
        diff, update = float((v - want[k]).norm()), float((want[k] - init[k]).norm())
        assert diff <= 1e-3 * update + 1e-7, (what, k, diff, update)


def test_rm_zero3_two_ranks(tmp_path, tiny_llama):
    from transformers import AutoModelForSequenceClassification

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is {i} plus 1?", "chosen": f"{i + 1}",
                                        "rejected": f"{i + 2} maybe"}) + "\n" for i in range(8)))
    common = dict(model=tiny_llama, data=data, lr=1e-3, batch_size=4, micro_batch_size=1, warmup_steps=1)
    _launch(["rm", str(_config(tmp_path / "z3.yaml", **common, out=tmp_path / "z3", zero_stage=3))], 2,
            tmp_path / "rm-z3")
    _launch(["rm", str(_config(tmp_path / "z0.yaml", **common, out=tmp_path / "z0", zero_stage=0))], 1,
            tmp_path / "rm-z0")

    torch.manual_seed(0)  # the score head rlhf rm starts from (seed 0)
    init = AutoModelForSequenceClassification.from_pretrained(str(tiny_llama), num_labels=1).state_dict()
    z3 = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "z3")).state_dict()
    z0 = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "z0")).state_dict()
    _check_close(z3, z0, init, "rm zero-3 x2 vs zero-0 x1")
    assert not torch.equal(z3["model.embed_tokens.weight"], init["model.embed_tokens.weight"])  # it trained
    s3, s0 = (json.loads((tmp_path / d / "rm_stats.json").read_text()) for d in ("z3", "z0"))
    assert s3["n"] == s0["n"] == 16 and s3["mean"] == pytest.approx(s0["mean"], abs=1e-4)
    assert not list(tmp_path.glob(".z3.tmp-*"))


def _sft_records(path: Path, n: int = 8) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"say {i}", "response": f"<think>\n{i}\n</think>\n\n{i} {i}"})
                            + "\n" for i in range(n)))
    return path


def test_sft_full_zero3_two_ranks_tied_embeddings(tmp_path, tiny_qwen2_tied):
    """Full fine-tuning of a model whose output layer is its input embedding (one tensor, gathered once)."""
    from transformers import AutoModelForCausalLM

    common = dict(model=tiny_qwen2_tied, data=_sft_records(tmp_path / "d.jsonl"), method="full", lr=1e-3,
                  batch_size=4, micro_batch_size=1, max_len=64, log_every=1)
    _launch(["sft", str(_config(tmp_path / "z3.yaml", **common, out=tmp_path / "z3", zero_stage=3))], 2,
            tmp_path / "sft-z3")
    _launch(["sft", str(_config(tmp_path / "z0.yaml", **common, out=tmp_path / "z0", zero_stage=0))], 1,
            tmp_path / "sft-z0")

    init = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_tied)).state_dict()
    z3 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "z3")).state_dict()
    z0 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "z0")).state_dict()
    _check_close(z3, z0, init, "sft full zero-3 x2 vs zero-0 x1")
    assert not torch.equal(z3["model.embed_tokens.weight"], init["model.embed_tokens.weight"])
    m3, m0 = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("z3", "z0"))
    assert [m["step"] for m in m3] == [m["step"] for m in m0] == [1, 2]
    assert [m["loss"] for m in m3] == pytest.approx([m["loss"] for m in m0], abs=1e-4)
    assert json.loads((tmp_path / "z3" / "sft_meta.json").read_text())["world_size"] == 2


def test_sft_lora_zero3_two_ranks(tmp_path, tiny_llama):
    """The adapter is gathered on every rank and written by rank 0; it loads with peft."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    common = dict(model=tiny_llama, data=_sft_records(tmp_path / "d.jsonl"), method="lora", lr=1e-2,
                  lora={"r": 4, "dropout": 0.0}, batch_size=4, micro_batch_size=1, max_len=64)
    _launch(["sft", str(_config(tmp_path / "z3.yaml", **common, out=tmp_path / "z3", zero_stage=3))], 2,
            tmp_path / "lora-z3")
    _launch(["sft", str(_config(tmp_path / "z0.yaml", **common, out=tmp_path / "z0", zero_stage=0))], 1,
            tmp_path / "lora-z0")

    z3, z0 = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("z3", "z0"))
    assert z3 and all(v.shape[0 if "lora_A" in k else 1] == 4 and v.numel() > 4 * 16 for k, v in z3.items())
    torch.manual_seed(0)  # the adapter rlhf sft starts from (seed 0)
    start = sft.add_lora(sft.load_model(tiny_llama), sft.LoraSettings(r=4, dropout=0.0))
    _check_close(z3, z0, get_peft_model_state_dict(start), "sft lora zero-3 x2 vs zero-0 x1")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in z3.items())  # B starts at 0: it trained
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(tmp_path / "z3"))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(z3)
    for k, v in z3.items():
        torch.testing.assert_close(loaded[k.replace(".weight", ".default.weight")], v, rtol=0, atol=0)
