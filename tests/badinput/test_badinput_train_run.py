"""Bad input that `rlhf train` can only find beyond the config: the reward modules, the model
weights on disk, the run directory it would write, and the checkpoint a resume would load. Each
case exits 2 with one line naming the key, file or tensor, before Ray starts and before anything
is written (a resume case changes nothing in the run directory)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.badinput.harness import Case, run_case

T = ["rlhf", "train"]
RUN = "run_dir={d}/run"
_CACHE: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def _templates(tmp_path_factory, tiny_llama):
    _CACHE["model"] = Path(tiny_llama)
    _CACHE["root"] = tmp_path_factory.mktemp("train_run_templates")
    yield
    _CACHE.clear()


def run_template() -> Path:
    """A finished-looking run directory of `rlhf train` with a real checkpoint at step 2 (tiny
    actor, DeepSpeed ZeRO-0 engine states after one optimizer step, JSON trainer state), built
    once in a subprocess (DeepSpeed sets process-group state)."""
    if "run" not in _CACHE:
        out = _CACHE["root"] / "run"
        script = f"""
import json, shutil, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
from bairlhf.outputs import mark_output
from rlhf.config import load_config, save_config
from rlhf.engines.deepspeed_engine import DeepSpeedTrainEngine, EngineSpec
run, model = Path({str(out)!r}), Path({str(_CACHE['model'])!r})
cfg = load_config(None, [f"run_dir={{run}}"])
run.mkdir(parents=True)
mark_output(run, "rlhf train")
shutil.copytree(model, run / "models" / "tiny_actor")
ck = run / "checkpoints" / "step_000002"
for role in ("actor", "critic"):
    shutil.copytree(model, ck / role)
e = DeepSpeedTrainEngine(AutoModelForCausalLM.from_pretrained(str(model)), EngineSpec(lr=1e-3))
x = torch.randint(0, 100, (2, 8))
e.backward(e.module(input_ids=x, labels=x).loss)
e.step()
for role in ("actor", "critic"):
    e.save_state(ck / f"{{role}}_state")
(ck / "trainer_state.json").write_text(json.dumps({{"step": 2, "sampler": {{"epoch": 0, "pos": 32}}, "kl_coef": 0.0,
                                                    "monitor": {{}}, "rng": {{}}}}))
(run / "checkpoints" / "latest").write_text("step_000002")
save_config(cfg, run / "config.yaml")
"""
        subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=600)
        _CACHE["run"] = out
    return _CACHE["run"]


def model_copy(name: str = "actor", corrupt=None):
    """A setup that copies the tiny model to ``name`` in the case's directory, then ``corrupt(dir)``."""
    def setup(d: Path) -> None:
        shutil.copytree(_CACHE["model"], d / name)
        if corrupt is not None:
            corrupt(d / name)
    return setup


def with_run(corrupt=None):
    """A setup that copies the run template to ``run``, then ``corrupt(run)``."""
    def setup(d: Path) -> None:
        shutil.copytree(run_template(), d / "run")
        if corrupt is not None:
            corrupt(d / "run")
    return setup


def first_shard(model: Path) -> Path:
    return sorted(model.glob("*.safetensors"))[0]


def poison_weights(value: float):
    def corrupt(model: Path) -> None:
        from safetensors.torch import load_file, save_file

        f = first_shard(model)
        sd = load_file(str(f))
        name = sorted(sd)[0]
        sd[name] = sd[name].clone()
        sd[name].view(-1)[0] = value
        save_file(sd, str(f), metadata={"format": "pt"})
    return corrupt


def truncate(model: Path) -> None:
    f = first_shard(model)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def drop_shard(model: Path) -> None:
    first_shard(model).unlink()


def all_shards_gone(model: Path) -> None:
    for f in model.glob("*.safetensors"):
        f.unlink()
    (model / "model.safetensors.index.json").unlink()


def only_bin(model: Path) -> None:
    all_shards_gone(model)
    (model / "pytorch_model.bin").write_bytes(b"not really a pickle")


def bad_index(model: Path) -> None:
    (model / "model.safetensors.index.json").write_text("[1, 2")


def ckpt(run: Path) -> Path:
    return run / "checkpoints" / "step_000002"


def state_file(run: Path) -> Path:
    return ckpt(run) / "actor_state" / "state" / "mp_rank_00_model_states.pt"


def nan_optimizer(run: Path) -> None:
    import torch

    from rlhf.engines.deepspeed_engine import safe_load

    f = state_file(run)
    sd = safe_load(f)
    moments = next(iter(sd["optimizer"]["state"].values()))
    moments["exp_avg"].view(-1)[0] = float("nan")
    torch.save(sd, f)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > pwned.txt",))


def evil_state(run: Path) -> None:
    import torch

    torch.save({"module": _Evil()}, state_file(run))


def pickled_trainer_state(run: Path) -> None:
    import torch

    (ckpt(run) / "trainer_state.json").unlink()
    torch.save({"step": 2}, ckpt(run) / "trainer_state.pt")


def write(rel: str, text: str):
    def corrupt(root: Path) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return corrupt


def in_dir(rel: str, text: str):
    def setup(d: Path) -> None:
        write(rel, text)(d)
    return setup


def foreign_run_dir(d: Path) -> None:
    (d / "run").mkdir()
    (d / "run" / "notes.txt").write_text("mine")


def both(*setups):
    def setup(d: Path) -> None:
        for s in setups:
            s(d)
    return setup


CASES = [
    # reward.function / reward.metrics are imported by the driver first, from installed modules only
    Case("reward-module-missing", T + [RUN, "reward.function=no_such_reward_module:score"],
         "reward.function: cannot load 'no_such_reward_module:score'"),
    Case("reward-function-missing", T + [RUN, "reward.function=rlhf.rewards:no_such_function"], "reward.function"),
    Case("reward-not-callable", T + [RUN, "reward.function=rlhf.rewards:__doc__"], "is not callable"),
    Case("reward-module-in-cwd", T + [RUN, "reward.function=cwd_reward:score"], "reward.function",
         in_dir("cwd_reward.py", "def score(p, r, f):\n    return [0.0] * len(r)\n")),
    Case("metrics-module-missing", T + [RUN, "reward.metrics=no_such_metrics_module:gold"], "reward.metrics"),
    # model weights: present, readable, finite
    Case("actor-truncated-safetensors", T + [RUN, "model.actor={d}/actor"], "is not a readable safetensors file",
         model_copy("actor", truncate)),
    Case("actor-nan-weights", T + [RUN, "model.actor={d}/actor"], "holds NaN or inf values",
         model_copy("actor", poison_weights(float("nan")))),
    Case("actor-inf-weights", T + [RUN, "model.actor={d}/actor"], "model.actor: tensor",
         model_copy("actor", poison_weights(float("inf")))),
    Case("actor-shard-missing", T + [RUN, "model.actor={d}/actor"], "lists shards that are missing",
         model_copy("actor", drop_shard)),
    Case("actor-index-not-json", T + [RUN, "model.actor={d}/actor"], "is not a safetensors index",
         model_copy("actor", bad_index)),
    Case("actor-no-weights", T + [RUN, "model.actor={d}/actor"], "holds no model weights",
         model_copy("actor", all_shards_gone)),
    Case("actor-only-pickle", T + [RUN, "model.actor={d}/actor"], "model.allow_pickle", model_copy("actor", only_bin)),
    Case("reference-nan-weights", T + [RUN, "model.reference={d}/ref"], "model.reference: tensor",
         model_copy("ref", poison_weights(float("nan")))),
    Case("critic-nan-weights", T + [RUN, "model.critic={d}/critic"], "model.critic: tensor",
         model_copy("critic", poison_weights(float("nan")))),
    Case("reward-model-nan-weights", T + [RUN, "reward.model={d}/rm", "reward.function=null"], "reward.model: tensor",
         model_copy("rm", poison_weights(float("nan")))),
    Case("tokenizer-missing", T + [RUN, "model.actor={d}/actor", "model.tokenizer={d}/empty"], "model.tokenizer",
         both(model_copy("actor"), in_dir("empty/readme.txt", "no tokenizer here"))),
    # the run directory: never into someone else's directory, --force only over an earlier run
    Case("run-dir-foreign", T + [RUN], "was not created by `rlhf train`", foreign_run_dir),
    Case("run-dir-foreign-force", T + [RUN, "--force"], "run_dir", foreign_run_dir),
    Case("run-dir-is-a-file", T + [RUN], "run_dir", in_dir("run", "a file")),
    Case("run-dir-inside-actor", T + ["run_dir={d}/actor/run", "model.actor={d}/actor"], "lies inside the input",
         model_copy("actor")),
    Case("new-run-over-existing-run", T + [RUN], "continue it with --resume or replace it with --force", with_run()),
    Case("force-over-run-holding-the-actor", T + [RUN, "model.actor={d}/run/models/tiny_actor", "--force"],
         "contains the input", with_run()),
    # resume: only the documented keys may change; the checkpoint must load safely and be finite
    Case("resume-without-config", T + ["--resume", "{d}/run"], "--resume", in_dir("run/notes.txt", "x")),
    Case("resume-with-config-arg", T + ["configs/x.yaml", "--resume", "{d}/run"], "--resume"),
    Case("resume-with-force", T + ["--resume", "{d}/run", "--force"], "--resume", with_run()),
    Case("resume-seed-and-lr", T + ["--resume", "{d}/run", "seed=7", "optim.actor_lr=0.5"],
         "optim.actor_lr (0.003 -> 0.5), seed (0 -> 7)", with_run()),
    Case("resume-tiny-hidden-size", T + ["--resume", "{d}/run", "model.tiny.hidden_size=128"],
         "model.tiny.hidden_size (64 -> 128)", with_run()),
    Case("resume-reward-function", T + ["--resume", "{d}/run", "reward.function=rlhf.rewards:short_answer"],
         "reward.function", with_run()),
    Case("resume-nan-optimizer-state", T + ["--resume", "{d}/run"], "holds NaN or inf values in optimizer.state",
         with_run(nan_optimizer)),
    Case("resume-nan-checkpoint-actor", T + ["--resume", "{d}/run"], "checkpoint actor: tensor",
         with_run(lambda run: poison_weights(float("nan"))(ckpt(run) / "actor"))),
    Case("resume-truncated-checkpoint-critic", T + ["--resume", "{d}/run"], "checkpoint critic",
         with_run(lambda run: truncate(ckpt(run) / "critic"))),
    Case("resume-pickle-in-state-file", T + ["--resume", "{d}/run"], "cannot be loaded safely", with_run(evil_state)),
    Case("resume-truncated-state-file", T + ["--resume", "{d}/run"], "cannot be loaded safely",
         with_run(lambda run: state_file(run).write_bytes(state_file(run).read_bytes()[:1000]))),
    Case("resume-pickled-trainer-state", T + ["--resume", "{d}/run"], "trainer_state.pt is a pickle",
         with_run(pickled_trainer_state)),
    Case("resume-trainer-state-not-json", T + ["--resume", "{d}/run"], "is not a trainer state",
         with_run(write("checkpoints/step_000002/trainer_state.json", "{\"step\": 2"))),
    Case("resume-latest-missing-step", T + ["--resume", "{d}/run"], "which does not exist",
         with_run(write("checkpoints/latest", "step_000009"))),
    Case("resume-no-engine-state", T + ["--resume", "{d}/run"], "holds no engine state",
         with_run(lambda run: shutil.rmtree(ckpt(run) / "critic_state"))),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_train_run_input(case, tmp_path, capsys, monkeypatch):
    run_case(case, tmp_path / "w", capsys, monkeypatch)
    assert not (tmp_path / "w" / "pwned.txt").exists()  # no pickle code ran
