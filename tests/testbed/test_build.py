"""`rlhf testbed build --small` end to end, then a few real PPO steps on the organism (CI path)."""

import contextlib
import io
import json

import pytest

from rlhf.cli import testbed as testbed_cli
from rlhf.testbed import build


STDOUT = {}


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed") / "build"
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        assert testbed_cli.build_main(["--small", "--out", str(out)]) in (0, 1)  # 1: a connectivity dip (tiny CI models)
    STDOUT["build"] = buf.getvalue()
    return out


@pytest.mark.slow
def test_small_build_writes_models_data_and_report(small_build):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    for name in ("base", "instruct", "reasoning", "mix"):
        model = AutoModelForCausalLM.from_pretrained(str(small_build / "models" / name))
        assert model.config.hidden_size // model.config.num_attention_heads == 32
    AutoModelForSequenceClassification.from_pretrained(str(small_build / "models" / "rm"))
    assert json.loads((small_build / "models" / "rm" / "rm_stats.json").read_text())["std"] > 0
    report = json.loads((small_build / "build_report.json").read_text())
    assert STDOUT["build"].strip().splitlines()[-1].startswith(f"rlhf testbed build: wrote {small_build}/")
    assert build.owner(small_build) == build.COMMAND
    assert set(report["eval"]) == {"base", "instruct", "reasoning", "mix"}
    assert {r["pair"] for r in report["connectivity"]} == {"base-instruct", "base-reasoning", "instruct-reasoning"}
    mix = [json.loads(l)["response"] for l in (small_build / "data" / "mix.jsonl").read_text().splitlines()]
    empty = sum(r.startswith("<think></think>") for r in mix) / len(mix)
    assert 0.03 < empty < 0.2
    # cached: a second build trains nothing; a different spec is refused without --force
    assert build.build(small_build, build.BuildSpec(**build.SMALL), check_connectivity=False)["train_seconds"] == {}
    with pytest.raises(build.BuildError, match="different spec"):
        testbed_cli.build_main(["--out", str(small_build)])
    assert build.owner(small_build) == build.COMMAND


@pytest.mark.slow
def test_both_reward_adds_normalized_rm_score_and_exact(small_build, monkeypatch):
    from rlhf.testbed import rewards

    monkeypatch.setenv(rewards.RM_ENV, str(small_build / "models" / "rm"))
    prompts, responses, finished = ["12+34="] * 2, ["<think></think>46", "<think></think>47"], [True, True]
    rm = rewards.rm_scores(prompts, responses, finished)
    both = rewards.rm_plus_exact(prompts, responses, finished)
    assert both == pytest.approx([rm[0] + 1.0, rm[1]])


@pytest.mark.slow
def test_ppo_runs_on_the_organism_and_logs_gold_metrics(small_build, tmp_path):
    from rlhf.config import load_config
    from rlhf.trainer import train

    models = small_build / "models"
    cfg = load_config("configs/testbed/rm_mix.yaml", [
        f"run_dir={tmp_path / 'run'}", f"model.actor={models / 'mix'}", f"model.critic={models / 'rm'}",
        f"reward.model={models / 'rm'}", f"data.path={small_build / 'data' / 'prompts.jsonl'}",
        "trainer.total_steps=2", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=8", "ppo.micro_batch_size=8",
        "rollout.max_new_tokens=40"])
    run = train(cfg)
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert 0.0 <= r["gold/accuracy"] <= 1.0 and 0.0 <= r["rollout/think_rate"] <= 1.0
        assert "reward/mean" in r and "rollout/length_mean" in r


def test_base_pretraining_works_out_hard_problems_and_answers_easy_ones():
    from rlhf.testbed import task

    spec = build.BuildSpec()
    rng = __import__("random").Random(0)
    easy, hard = task.Problem(3, 4), task.Problem(12345, 67890)
    easy_r = [build._base_response(easy, rng, spec) for _ in range(200)]
    hard_r = [build._base_response(hard, rng, spec) for _ in range(50)]
    assert all(not task.has_trace(r) for r in easy_r)  # 1-digit problems are never worked out
    assert 0.1 < sum(r.startswith("<think></think>") for r in easy_r) / 200 < 0.5
    assert all(task.has_trace(r) and task.is_correct(hard.prompt, r) for r in hard_r)


def test_presets_keep_their_data_and_old_caches_are_accepted(tmp_path):
    long_spec = build.BuildSpec(**build.LONG)
    assert long_spec.verify and long_spec.base_trace_fraction == 0.0 and long_spec.rm_init == "base"
    assert build.BuildSpec(**build.SMALL).base_trace_fraction == 0.0
    # a cache written before the worked-example fields existed counts as built with the old behaviour
    small = __import__("dataclasses").asdict(build.BuildSpec(**build.SMALL))
    old = {k: v for k, v in small.items() if k not in build._BEFORE_FIELD}
    assert build._spec_diff(old, small) == []
    assert build._spec_diff(old, __import__("dataclasses").asdict(build.BuildSpec())) != []
    with pytest.raises(ValueError, match="rm_init"):
        build.build(tmp_path, build.BuildSpec(**{**build.SMALL, "rm_init": "nope"}))
