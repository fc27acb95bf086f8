"""scripts/gpu_check.py, its CPU side (issue 14.5): argument parsing and bad usage (exit 2, one
line, nothing written), the run on a machine without CUDA (every GPU step skipped "no CUDA
device", exit 3, the table and result files), skip decisions for every step on GPU facts, table
rendering from recorded results, metrics parsing and MFU arithmetic. The step bodies need a GPU
and are not run here."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from tests.badinput.harness import snapshot

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


gc = _load()
GPU_STEPS = [s.name for s in gc.STEPS if s.needs_cuda]

CPU_FACTS = {"smi": {"gpus": [], "driver": "", "driver_cuda": None},
             "torch": {"version": "2.13.0+cpu", "cuda": None, "cuda_available": False, "device_count": 0}}


def gpu_facts(n: int = 1, name: str = "NVIDIA H200") -> dict:
    return {"smi": {"gpus": [{"name": name, "memory": "143771 MiB"}] * n, "driver": "570.1", "driver_cuda": "12.8"},
            "torch": {"version": "2.13.0", "cuda": "12.8", "cuda_available": True, "device_count": n,
                      "device_name": name, "bf16": True}}


OPTS = {"dry_run": False, "steps": set(gc.STEP_NAMES), "no_install": False, "megatron_present": True,
        "model_given": False}


# ---------------------------------------------------------------------------- arguments

def test_defaults():
    a = gc.parse_args([])
    assert (a.budget, a.steps, a.out, a.train_steps, a.dry_run, a.force) == (600.0, gc.STEP_NAMES, "runs/gpu_check",
                                                                               3, False, False)
    a = gc.parse_args(["--steps", "deepspeed,vllm", "--timeout", "vllm=90", "--timeout", "install=30",
                       "--budget", "900", "--peak-tflops", "700", "--no-install"])
    assert a.steps == ("deepspeed", "vllm") and dict(a.timeout) == {"vllm": 90.0, "install": 30.0}
    assert (a.budget, a.peak_tflops, a.no_install) == (900.0, 700.0, True)


def _bad_results(d: Path):
    (d / "bad.json").write_text('{"steps": [{"name": "x", "status": "maybe"}]}')


def _foreign_out(d: Path):
    (d / "out").mkdir()
    (d / "out" / "keep.txt").write_text("not gpu_check's")


BAD = [  # (id, argv, expected substring of the one stderr line, setup)
    ("budget-zero", ["--budget", "0"], "--budget", None),
    ("budget-nan", ["--budget", "nan"], "--budget", None),
    ("budget-word", ["--budget", "ten"], "'ten' is not a number", None),
    ("steps-unknown", ["--steps", "deepspeed,cuda"], "unknown step cuda", None),
    ("steps-empty", ["--steps", ","], "--steps", None),
    ("timeout-no-eq", ["--timeout", "vllm"], "STEP=SECONDS", None),
    ("timeout-bad-step", ["--timeout", "gpu=10"], "STEP=SECONDS", None),
    ("timeout-negative", ["--timeout", "vllm=-5"], "must be a finite number > 0", None),
    ("train-steps-zero", ["--train-steps", "0"], "--train-steps", None),
    ("peak-negative", ["--peak-tflops", "-1"], "--peak-tflops", None),
    ("tol-zero", ["--rollout-check-tol", "0"], "--rollout-check-tol", None),
    ("model-missing", ["--model", "{d}/nope"], "--model", None),
    ("python-missing", ["--python", "{d}/nope/python"], "--python", None),
    ("from-results-missing", ["--from-results", "{d}/none.json"], "--from-results", None),
    ("from-results-malformed", ["--from-results", "{d}/bad.json"], "not a gpu_check results.json", _bad_results),
    ("unknown-flag", ["--gpus", "8"], "unrecognized arguments", None),
    ("out-exists", ["--out", "{d}/out"], "already exists; pass --force", _foreign_out),
    ("out-foreign-force", ["--out", "{d}/out", "--force"], "was not written by `gpu_check`", _foreign_out),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_usage(case, tmp_path, capsys, monkeypatch):
    cid, argv, expect, setup = case
    if setup is not None:
        setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    rc = gc.main([a.replace("{d}", str(tmp_path)) for a in argv])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == gc.EXIT_USAGE, (cid, rc, err)
    assert len(lines) == 1 and lines[0].startswith("gpu_check: ") and expect in lines[0], (cid, err)
    assert "Traceback" not in err + out
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------- this machine (no CUDA)

_HERE: dict = {}


def _no_cuda_here():
    if "cuda" not in _HERE:
        _HERE["cuda"] = gc.has_cuda(gc.gather_facts(gc._python(gc.parse_args([]))))
    if _HERE["cuda"]:
        pytest.skip("this machine has a CUDA device")


def _rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] in gc.STEP_NAMES:
            rows[parts[0]] = parts
    return rows


def test_dry_run_without_cuda(tmp_path, capsys, monkeypatch):
    _no_cuda_here()
    monkeypatch.chdir(tmp_path)
    rc = gc.main(["--dry-run"])
    out = capsys.readouterr().out
    assert rc == gc.EXIT_NO_CUDA == 3
    rows = _rows(out.split("\n\n", 1)[1])
    assert list(rows) == list(gc.STEP_NAMES)  # one table, every step once
    assert rows["env"][1] == "PASS"
    for name in GPU_STEPS:
        assert rows[name][1] == "SKIP" and " ".join(rows[name][-3:]) == "no CUDA device", rows[name]
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_run_without_cuda_writes_results_and_refuses_reuse(tmp_path, capsys, monkeypatch):
    _no_cuda_here()
    monkeypatch.chdir(tmp_path)
    assert gc.main(["--out", "o"]) == gc.EXIT_NO_CUDA
    capsys.readouterr()
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert data["exit_code"] == 3 and [s["name"] for s in data["steps"]] == list(gc.STEP_NAMES)
    assert all(s["status"] == "skip" and s["reason"] == gc.NO_CUDA for s in data["steps"] if s["name"] != "env")
    md = (tmp_path / "o" / "results.md").read_text()
    assert "| step | status | s | step-0 mismatch | rollout tok/s | trainer tok/s | MFU | note |" in md
    assert md.count("| SKIP |") == len(GPU_STEPS)
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temporary sibling left
    # again: refused without --force (nothing changed), replaced with it
    before = snapshot(tmp_path)
    assert gc.main(["--out", "o"]) == gc.EXIT_USAGE
    assert "already exists" in capsys.readouterr().err and snapshot(tmp_path) == before
    assert gc.main(["--out", "o", "--force"]) == gc.EXIT_NO_CUDA
    # the recorded results render again
    assert gc.main(["--from-results", "o/results.json"]) == gc.EXIT_NO_CUDA
    assert len(_rows(capsys.readouterr().out)) == len(gc.STEP_NAMES)


# ---------------------------------------------------------------------------- decisions on GPU facts

def _reason(name, facts=None, opts=None, done=None, left=600.0):
    return gc.skip_reason(gc.BY_NAME[name], facts or gpu_facts(), {**OPTS, **(opts or {})}, done or {}, left)


def test_every_step_runs_on_a_gpu_machine_except_nccl_on_one_gpu():
    got = {n: _reason(n) for n in gc.STEP_NAMES}
    assert got.pop("vllm_nccl").startswith("needs 2 GPUs")
    assert set(got.values()) == {None}
    assert _reason("vllm_nccl", gpu_facts(2)) is None


def test_failed_install_without_cuda_torch_skips_the_gpu_steps():
    facts = gpu_facts()
    facts["torch"] = dict(CPU_FACTS["torch"])
    done = {"install": R("install", "fail", "pip")}
    assert "install failed" in _reason("deepspeed", facts, done=done)
    assert _reason("model", facts, done=done) is None


def test_no_cuda_wins_over_everything():
    for n in GPU_STEPS:
        assert _reason(n, CPU_FACTS, {"dry_run": True, "steps": set(), "no_install": True}, left=0) == gc.NO_CUDA
    assert _reason("env", CPU_FACTS) is None


def test_smi_alone_counts_as_cuda():  # a GPU with a CPU torch: install runs (it brings the CUDA build)
    facts = gpu_facts()
    facts["torch"] = dict(CPU_FACTS["torch"])
    assert gc.has_cuda(facts) and _reason("install", facts) is None


R = gc.Result


@pytest.mark.parametrize("name,opts,done,left,expect", [
    ("deepspeed", {"dry_run": True}, {}, 600, "dry run"),
    ("deepspeed", {"steps": {"env", "vllm"}}, {}, 600, "not selected (--steps)"),
    ("install", {"no_install": True}, {}, 600, "--no-install"),
    ("model", {"model_given": True}, {}, 600, "--model given"),
    ("megatron", {"megatron_present": False}, {}, 600, "rlhf.engines.megatron not present"),
    ("deepspeed", {}, {"install": R("install", "fail", "pip")}, 600, None),  # torch sees CUDA: go on
    ("model", {}, {"install": R("install", "fail", "pip")}, 600, None),
    ("deepspeed", {}, {"install": R("install", "skip", "already installed")}, 600, None),
    ("deepspeed", {}, {"model": R("model", "fail", "x")}, 600, "needs model (fail)"),
    ("deepspeed", {"model_given": True}, {"model": R("model", "skip", "--model given")}, 600, None),
    ("train_vllm", {}, {"model": R("model", "pass"), "vllm": R("vllm", "skip", "no vllm")}, 600, "needs vllm (skip)"),
    ("train_hf", {}, {"model": R("model", "pass"), "vllm": R("vllm", "fail", "x")}, 600, None),
    ("train_hf", {}, {}, 5, "budget exhausted (5 s left)"),
])
def test_skip_reasons(name, opts, done, left, expect):
    got = _reason(name, opts=opts, done=done, left=left)
    assert (got is None and expect is None) or (got is not None and expect is not None and expect in got), got


@pytest.mark.parametrize("statuses,facts,code", [
    (["pass", "pass"], gpu_facts(), 0), (["pass", "skip"], gpu_facts(), 0), (["pass", "fail", "skip"], gpu_facts(), 1),
    (["pass", "skip"], CPU_FACTS, 3), (["pass", "fail"], CPU_FACTS, 1),
])
def test_exit_codes(statuses, facts, code):
    assert gc.exit_code([R(f"s{i}", s) for i, s in enumerate(statuses)], facts) == code


# ---------------------------------------------------------------------------- table, metrics, MFU

RECORDED = [
    R("env", "pass", "torch 2.13.0, CUDA build 12.8, 1 visible device(s)", 3.2),
    R("deepspeed", "pass", "ZeRO-2 bf16", 41.0, {"trainer_tok_s": 61234.5, "flops_per_token": 1e9,
                                                  "trainable_models": 1}),
    R("vllm", "pass", "reload ok; gloo broadcast 257 MiB in 0.41 s", 75.3, {"rollout_tok_s": 15321.7}),
    R("vllm_nccl", "skip", "needs 2 GPUs: NCCL refuses two ranks on one GPU"),
    R("train_hf", "fail", "rlhf train exit 2: kl | too big", 88.0, {"mismatch": 0.00184, "rollout_tok_s": 900.0}),
]


def test_render_text_and_markdown_from_recorded_results():
    rs = [gc.Result(r.name, r.status, r.reason, r.seconds, dict(r.metrics)) for r in RECORDED]
    for r in rs:
        gc.fill_mfu(r, 989.0)
    assert math.isclose(rs[1].metrics["mfu"], 61234.5 * 1e9 / 989e12)
    text = gc.render_text(rs, "hdr")
    lines = text.splitlines()
    assert lines[0] == "hdr" and lines[1].split()[:3] == ["step", "status", "s"]
    rows = _rows(text)
    assert rows["deepspeed"][:7] == ["deepspeed", "PASS", "41", "-", "-", "61,234", "6.2%"]
    assert rows["vllm"][:7] == ["vllm", "PASS", "75", "-", "15,322", "-", "-"]
    assert rows["train_hf"][:4] == ["train_hf", "FAIL", "88", "0.00184"]
    # columns line up: every row's status starts where the header's does
    col = lines[1].index("status")
    assert all(ln[col:col + 4] in ("PASS", "FAIL", "SKIP", "----") for ln in lines[2:])
    md = gc.render_markdown(rs, "## gpu_check")
    assert md.startswith("## gpu_check\n\n| step |")
    body = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith(("| step", "| ---"))]
    assert len(body) == len(rs) and all(ln.count(" | ") == len(gc.COLUMNS) - 1 for ln in body)  # "|" in a note escaped
    assert "| train_hf | FAIL | 88 | 0.00184 | 900 | - | - | rlhf train exit 2: kl / too big |" in md


def test_results_json_round_trip(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(gc.results_json(RECORDED, gpu_facts(), 989.0, 1))
    results, facts, peak = gc.load_results(p)
    assert results == RECORDED and peak == 989.0 and gc.has_cuda(facts)


def test_train_metrics_from_records():
    recs = [
        {"step": 0, "kl/rollout_vs_trainer": 2.5e-4, "kl/rollout_vs_trainer_max_abs": 0.03, "rollout/num_tokens": 1000.0,
         "timing/generate": 10.0, "perf/tokens_per_s": 100.0, "timing/step": 30.0, "timing/train": 15.0},
        {"step": 1, "rollout/num_tokens": 1000.0, "timing/generate": 2.0, "perf/tokens_per_s": 500.0,
         "timing/step": 6.0, "timing/train": 3.0},
        {"step": 2, "rollout/num_tokens": 1200.0, "timing/generate": 2.0, "perf/tokens_per_s": 500.0,
         "timing/step": 6.0, "timing/train": 2.0},
    ]
    m = gc.train_metrics(recs, ppo_epochs=2)
    assert m["mismatch"] == 2.5e-4 and m["mismatch_max_abs"] == 0.03 and m["steps"] == 3
    assert m["rollout_tok_s"] == statistics_median([500.0, 600.0])  # step 0 (warm-up) left out
    assert m["trainer_tok_s"] == statistics_median([500 * 6 * 2 / 3.0, 500 * 6 * 2 / 2.0])
    one = gc.train_metrics(recs[:1], ppo_epochs=1)  # a single step: its own numbers
    assert one["rollout_tok_s"] == 100.0 and one["trainer_tok_s"] == 100.0 * 30 / 15


def statistics_median(xs):
    import statistics

    return statistics.median(xs)


def test_train_metrics_from_a_tolerance_stop():
    err = "ray noise\nrlhf train: kl/rollout_vs_trainer = 0.00184 at step 0 exceeds trainer.rollout_check_tol = 0.001\n"
    m = gc.train_metrics([], err)
    assert m == {"steps": 0, "mismatch": 0.00184}
    assert gc.train_metrics([], "other failure") == {"steps": 0}


def test_read_jsonl_ignores_a_torn_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 0, "a": 1}\n{"step": 1, "a": 2}\n{"step": 2, "a"')
    assert [r["step"] for r in gc.read_jsonl(p)] == [0, 1]
    assert gc.read_jsonl(tmp_path / "missing.jsonl") == []


def test_fill_mfu_needs_both_rate_and_flops():
    r = R("x", "pass", metrics={"trainer_tok_s": 1000.0, "flops_per_token": 1e9, "trainable_models": 2})
    gc.fill_mfu(r, 100.0)
    assert math.isclose(r.metrics["mfu"], 2 * 1000 * 1e9 / 100e12)
    r = R("x", "pass", metrics={"trainer_tok_s": 1000.0})
    gc.fill_mfu(r, 100.0)
    assert "mfu" not in r.metrics
    r = R("x", "pass", metrics={"trainer_tok_s": 1000.0, "flops_per_token": 1e9})
    gc.fill_mfu(r, None)  # unknown GPU, no --peak-tflops
    assert "mfu" not in r.metrics


def test_param_count_matches_the_models(tiny_llama, tiny_qwen2_tied):
    import torch
    from transformers import AutoModelForCausalLM

    for d in (tiny_llama, tiny_qwen2_tied):
        cfg = json.loads((Path(d) / "config.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        assert gc.llama_param_count(cfg) == sum(p.numel() for p in model.parameters()), d
    smollm2 = {"hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152, "intermediate_size": 1536,
               "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True}
    assert gc.llama_param_count(smollm2) == 134_515_008  # SmolLM2-135M


def test_nvidia_smi_parsing_and_cuda_versions():
    q = "NVIDIA H200, 143771 MiB, 570.124.06\nNVIDIA H200, 143771 MiB, 570.124.06\n"
    h = "| NVIDIA-SMI 570.124.06   Driver Version: 570.124.06   CUDA Version: 12.8     |"
    s = gc.parse_nvidia_smi(q, h)
    assert len(s["gpus"]) == 2 and s["gpus"][0]["name"] == "NVIDIA H200"
    assert (s["driver"], s["driver_cuda"]) == ("570.124.06", "12.8")
    assert gc.parse_nvidia_smi("", "") == {"gpus": [], "driver": "", "driver_cuda": None}
    assert gc.cuda_too_new("13.0", "12.8") and gc.cuda_too_new("12.9", "12.8")
    assert not gc.cuda_too_new("12.8", "12.8") and not gc.cuda_too_new("12.6", "13.0")
    assert not gc.cuda_too_new(None, "12.8") and not gc.cuda_too_new("12.8", None)


def test_ds_env_needed_until_the_workers_choose_the_accelerator():
    src = (ROOT / "src" / "rlhf" / "workers" / "model_workers.py").read_text()
    fixed = 'WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}'
    assert gc.needs_ds_env('WORKER_ENV = {"DS_ACCELERATOR": "cpu", "X": "1"}')
    assert not gc.needs_ds_env(fixed)
    assert isinstance(gc.needs_ds_env(src), bool)


def test_install_plan():
    cons = gc.gpu_constraints("# c\ntorch==2.13.0\ntransformers>=5.0,<6\nray==2.60.0\n", "0.32.0")
    assert "transformers" not in cons and "torch==2.13.0" in cons and cons.endswith("vllm==0.32.0\n")
    cmds = gc.install_commands("py", "torch==2.13.0", "0.32.0", Path("c.txt"))
    assert cmds[0] == ["py", "-m", "pip", "uninstall", "-y", "torch"]  # a +cpu build satisfies ==2.13.0
    assert cmds[1][-1] == "torch==2.13.0" and "--no-deps" not in cmds[1]  # its nvidia-* libraries come too
    assert cmds[2][-1] == "vllm==0.32.0" and "-c" in cmds[2]
    assert cmds[3][-2:] == ["-e", str(gc.ROOT)] and "--no-deps" in cmds[3]
    assert all(c[:4] == ["py", "-m", "pip", "install"] for c in cmds[1:])
    assert all("--index-url" not in c and "--extra-index-url" not in c for c in cmds)  # the registry pip is set up with


def test_constraints_pin_matches_the_vllm_release():
    pins = (ROOT / "constraints.txt").read_text()
    assert "torch==2.13.0" in pins  # vllm 0.32.0 pins torch==2.13.0; bump VLLM_VERSION with the torch pin
    assert gc.VLLM_VERSION == "0.32.0"


def test_train_overrides_form_a_valid_config(tmp_path):
    from rlhf.config import load_config

    args = gc.train_overrides(str(tmp_path / "model"), "vllm", str(tmp_path / "run"), 3)
    cfg = load_config(ROOT / args[0], args[1:], check_paths=False)
    assert cfg.deepspeed.bf16 and cfg.rollout.engine == "vllm" and cfg.trainer.total_steps == 3
    assert cfg.cluster.gpus_per_worker == 1 and cfg.ppo.ppo_epochs == gc.PPO_EPOCHS
    assert cfg.ppo.rollout_batch_size == gc.TRAIN_BATCH


def test_error_line_finds_the_cli_message_among_progress_bars():
    err = ("ppo:   0%|          | 0/2 [00:00<?, ?step/s]rlhf train: kl/rollout_vs_trainer = 0.00155 at step 0 "
           "exceeds trainer.rollout_check_tol = 0.001: the rollout engine\n\rppo:   0%|   | 0/2 [00:02<?, ?step/s]\n")
    assert gc.error_line(err).startswith("rlhf train: kl/rollout_vs_trainer = 0.00155")
    assert gc.error_line("a\nlast line\n") == "last line"
    assert gc._tail("x\r y \r\n") == "y"
    assert gc.error_line("") == ""


def test_rollout_check_tol_reaches_the_train_overrides():
    a = gc.parse_args(["--rollout-check-tol", "0.01"])
    assert a.rollout_check_tol == 0.01 and gc.parse_args([]).rollout_check_tol is None


def test_step_subprocess_protocol_and_timeout(tmp_path):
    """A step body runs in a subprocess and reports through its JSON file; a timeout is a FAIL naming it."""
    _no_cuda_here()
    args = gc.parse_args([])
    env = gc._step_env(CPU_FACTS)
    env.pop("GPU_CHECK_SMOKE_CPU", None)
    r = gc.run_step_subprocess(gc.BY_NAME["deepspeed"], args, gc._python(args), tmp_path, None, 120, env)
    assert (r.status, r.name) == ("fail", "deepspeed") and "sees no CUDA device" in r.reason, r
    assert (tmp_path / "logs" / "deepspeed.log").is_file() and (tmp_path / "steps" / "deepspeed.json").is_file()
    r = gc.run_step_subprocess(gc.BY_NAME["megatron"], args, gc._python(args), tmp_path, None, 0.01, env)
    assert r.status == "fail" and r.reason.startswith("timed out after 0 s"), r


def test_step_env(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    env = gc._step_env(gpu_facts())
    assert "RAY_ADDRESS" not in env and env["HF_HUB_OFFLINE"] == "1"
    src = (ROOT / "src" / "rlhf" / "workers" / "model_workers.py").read_text()
    assert ("DS_ACCELERATOR" in env) == gc.needs_ds_env(src)  # set for the workers only while they default to cpu
    assert "DS_ACCELERATOR" not in gc._step_env(CPU_FACTS)
