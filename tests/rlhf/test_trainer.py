"""`rlhf train` end to end on the tiny CPU config: it learns, and a run killed with SIGKILL and
resumed logs exactly the uninterrupted run's per-step metrics. Bad inputs stop before any work."""

from __future__ import annotations

import json

import pytest

from rlhf.config import ConfigError, load_config
from rlhf.trainer import NON_DETERMINISTIC_PREFIXES, train
from runs import kill_then_resume

STEPS = 24
COMMON = ["trainer.save_every=4", "trainer.probe_every=0", "data.num_builtin=64"]  # checkpoints at epoch ends


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _deterministic(rec):
    return {k: v for k, v in rec.items() if not k.startswith(NON_DETERMINISTIC_PREFIXES)}



@pytest.fixture(scope="module")
def reference_run(ray_address, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ppo") / "ref"
    cfg = load_config(None, COMMON + [f"run_dir={run_dir}", f"trainer.total_steps={STEPS}"])
    train(cfg)
    return run_dir


@pytest.mark.slow
def test_reward_rises_and_run_dir_is_complete(reference_run):
    recs = _records(reference_run)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    first = sum(r["reward/mean"] for r in recs[:4]) / 4
    last = sum(r["reward/mean"] for r in recs[-4:]) / 4
    assert last > first + 0.2, (first, last)
    assert recs[0]["kl/rollout_vs_trainer"] < 1e-3
    for key in ("kl/policy_vs_sampling", "actor/clipfrac", "actor/entropy", "critic/explained_var",
                "stability/length_collapse", "timing/generate", "perf/tokens_per_s", "reward/bucket_00_mean"):
        assert key in recs[-1], key
    assert list((reference_run / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = reference_run / "checkpoints" / (reference_run / "checkpoints" / "latest").read_text().strip()
    assert ckpt.name == f"step_{STEPS:06d}"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(str(ckpt / "actor"))  # loadable directly
    AutoTokenizer.from_pretrained(str(ckpt / "actor"))


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(reference_run, ray_address, tmp_path):
    run_dir = tmp_path / "killed"
    total = 20
    kill_then_resume(COMMON, run_dir, ray_address, total, timeout=240)
    got = [_deterministic(r) for r in _records(run_dir)]
    want = [_deterministic(r) for r in _records(reference_run)[:total]]
    assert [r["step"] for r in got] == list(range(1, total + 1))
    for g, w in zip(got, want):
        assert g == w, (g["step"], {k: (g.get(k), w.get(k)) for k in set(g) | set(w) if g.get(k) != w.get(k)})


@pytest.mark.slow
def test_bf16_mixed_precision_run(ray_address, tmp_path):
    """deepspeed.bf16: bf16 actor and critic with fp32 masters, bf16 frozen roles and rollout engine;
    the step-0 rollout-vs-trainer check still holds, the run trains, and checkpoints are bf16."""
    import torch
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "bf16"
    cfg = load_config(None, COMMON + [f"run_dir={run_dir}", "trainer.total_steps=4", "deepspeed.bf16=true"])
    train(cfg)
    recs = _records(run_dir)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[0]["kl/rollout_vs_trainer"] < 1e-3
    assert all(abs(r[k]) < float("inf") for r in recs for k in ("actor/pg_loss", "critic/loss", "actor/grad_norm"))
    actor = AutoModelForCausalLM.from_pretrained(str(run_dir / "checkpoints" / "step_000004" / "actor"), dtype="auto")
    assert actor.dtype == torch.bfloat16


def test_reward_model_with_another_tokenizer_is_refused(tmp_path):
    from rlhf import tiny

    actor = tiny.make_tiny_model(tmp_path / "actor", tokenizer=tiny.train_tokenizer())
    rm = tiny.make_tiny_model(tmp_path / "rm", tokenizer=tiny.train_tokenizer(vocab_size=320))
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"model.actor={actor}", f"reward.model={rm}",
                             "reward.function=null"])
    with pytest.raises(ConfigError, match=r"^reward.model: tokenizer of .* differs from the actor's"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_missing_weights_are_refused(tmp_path):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"model.actor={empty}"])
    with pytest.raises(ConfigError, match=r"^model.actor: .* holds no model weights"):
        train(cfg)


def test_cli_reports_bad_override(capsys):
    from rlhf.cli import main

    assert main(["train", "trainer.total_stepz=3"]) == 2
    assert "trainer.total_stepz: unknown key" in capsys.readouterr().err
