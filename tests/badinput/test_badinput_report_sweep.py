"""Bad input to `rlhf report` and `rlhf sweep`: one named error (exit 2, one stderr line, no
traceback), and nothing in the working directory created, changed or deleted (issue 12)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from badinput.harness import Case, run_case

ROOT = Path(__file__).resolve().parents[2]
PPO = ROOT / "configs" / "ppo" / "tiny_cpu.yaml"
FAMILY: dict = {}
"""The tiny BAI family (set by the test from the session fixture before each case)."""

GOOD = [{"step": i, "reward/mean": 0.1 * i, "rollout/length_mean": 20.0, "reward/std": 1.0} for i in range(6)]


# ----------------------------------------------------------------------------- rlhf report

def run(name="run", lines=None, config=None, raw: bytes | None = None):
    """Setup writing a run directory ``name`` with these metrics lines (default: GOOD) and config."""
    def setup(d: Path):
        r = d / name
        r.mkdir(parents=True, exist_ok=True)
        if raw is not None:
            (r / "metrics.jsonl").write_bytes(raw)
        else:
            body = lines if lines is not None else [json.dumps(x) for x in GOOD]
            (r / "metrics.jsonl").write_text("".join(ln + "\n" for ln in body))
        if config is not None:
            (r / "config.yaml").write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return setup


def both(*setups):
    def setup(d: Path):
        for s in setups:
            s(d)
    return setup


def mkdir_with(path: str, file: str | None = "notes.txt"):
    def setup(d: Path):
        (d / path).mkdir(parents=True, exist_ok=True)
        if file:
            (d / path / file).write_text("user data\n")
    return setup


def earlier(lines):
    return [json.dumps(x) for x in GOOD[:2]] + lines + [json.dumps(x) for x in GOOD[2:]]


REPORT = ["rlhf", "report", "{d}/run", "--out", "{d}/rep"]

REPORT_CASES = [
    Case("metrics_bare_number", REPORT, "metrics.jsonl:3: expected a JSON object", run(lines=earlier(["7"]))),
    Case("metrics_bare_number_first", REPORT, "metrics.jsonl:1: expected a JSON object", run(lines=["3.5"])),
    Case("metrics_list_line", REPORT, "metrics.jsonl:3: expected a JSON object", run(lines=earlier(["[1, 2]"]))),
    Case("metrics_corrupt_middle", REPORT, "metrics.jsonl:3: not a JSON line",
         run(lines=earlier(['{"step": 2, "reward/me']))),
    Case("metrics_binary_middle", REPORT, "metrics.jsonl:2: not a JSON line",
         run(raw=b'{"step": 0}\n\xff\xfe\x00garbage\n{"step": 1}\n')),
    Case("metrics_no_step", REPORT, 'metrics.jsonl:3: "step" must be an integer',
         run(lines=earlier(['{"reward/mean": 1.0}']))),
    Case("metrics_step_string", REPORT, 'metrics.jsonl:3: "step" must be an integer',
         run(lines=earlier(['{"step": "2", "reward/mean": 1.0}']))),
    Case("metrics_step_negative", REPORT, 'metrics.jsonl:1: "step" must be an integer >= 0',
         run(lines=['{"step": -1}'])),
    Case("metrics_step_float", REPORT, 'metrics.jsonl:3: "step" must be an integer',
         run(lines=earlier(['{"step": 2.5}']))),
    Case("metrics_value_string", REPORT, "metrics.jsonl:3: reward/mean: expected a number",
         run(lines=earlier(['{"step": 9, "reward/mean": "high"}']))),
    Case("metrics_value_object", REPORT, "metrics.jsonl:3: kl/to_reference: expected a number",
         run(lines=earlier(['{"step": 9, "kl/to_reference": {"a": 1}}']))),
    Case("metrics_empty", REPORT, "metrics.jsonl: holds no step records", run(lines=[])),
    Case("metrics_missing", REPORT, "run/metrics.jsonl: no such file", mkdir_with("run", None)),
    Case("run_dir_missing", ["rlhf", "report", "{d}/nope", "--out", "{d}/rep"], "nope/metrics.jsonl"),
    Case("run_dir_is_file", REPORT, "is not a directory", lambda d: (d / "run").write_text("x")),
    Case("config_yaml_syntax", REPORT, "config.yaml:3:1: YAML syntax error", run(config="metrics:\n  bucket_width: [10\n")),
    Case("config_yaml_tab", REPORT, "tabs", run(config="metrics:\n\tbucket_width: 10\n")),
    Case("config_not_mapping", REPORT, "must be a mapping", run(config="- 1\n- 2\n")),
    Case("config_bucket_width_zero", REPORT, "metrics.bucket_width", run(config={"metrics": {"bucket_width": 0}})),
    Case("config_unknown_metric_key", REPORT, "metrics.bucket_widht: unknown key",
         run(config={"metrics": {"bucket_widht": 10}})),
    Case("config_num_buckets_text", REPORT, "metrics.num_buckets", run(config={"metrics": {"num_buckets": "ten"}})),
    Case("config_num_buckets_too_many", REPORT, "metrics.num_buckets", run(config={"metrics": {"num_buckets": 500}})),
    Case("config_collapse_over_recovery", REPORT, "metrics.collapse_fraction",
         run(config={"metrics": {"collapse_fraction": 0.95}})),
    Case("config_metrics_not_mapping", REPORT, "metrics: expected a mapping", run(config={"metrics": 5})),
    Case("runs_with_different_buckets",
         ["rlhf", "report", "{d}/a", "{d}/b", "--out", "{d}/rep"], "metrics.bucket_width/num_buckets",
         both(run("a", config={"metrics": {"bucket_width": 10}}), run("b", config={"metrics": {"bucket_width": 50}}))),
    Case("out_exists_no_force", REPORT, "pass --force", both(run(), mkdir_with("rep"))),
    Case("out_user_dir_force", REPORT + ["--force"], "was not written by `rlhf report`", both(run(), mkdir_with("rep"))),
    Case("out_empty_user_dir_force", REPORT + ["--force"], "was not written by `rlhf report`",
         both(run(), mkdir_with("rep", None))),
    Case("out_is_file_force", REPORT + ["--force"], "not a directory",
         both(run(), lambda d: (d / "rep").write_text("x"))),
    Case("out_is_the_run", ["rlhf", "report", "{d}/run", "--out", "{d}/run", "--force"], "is the input", run()),
    Case("out_inside_the_run", ["rlhf", "report", "{d}/run", "--out", "{d}/run/figs", "--force"],
         "lies inside the input", run()),
    Case("out_contains_the_run", ["rlhf", "report", "{d}/runs/r1", "--out", "{d}/runs", "--force"],
         "contains the input", run("runs/r1")),
    Case("out_missing_flag", ["rlhf", "report", "{d}/run"], "--out", run()),
    Case("unknown_flag", REPORT + ["--colour"], "unrecognized arguments: --colour", run()),
]


# ----------------------------------------------------------------------------- rlhf sweep

def sweep(change=None, drop=(), raw: str | None = None, name="sweep.yaml"):
    """Setup writing a sweep YAML into the case dir (tiny family paths), edited by ``change``."""
    def setup(d: Path):
        if raw is not None:
            (d / name).write_text(raw)
            return
        data = {
            "out": str(d / "out"), "ppo_config": str(PPO), "overrides": ["trainer.total_steps=2"],
            "merge": {"method": "bai", "base": str(FAMILY["base"]), "dtype": "float32", "alphas": [0.1, 0.5],
                      "sft_models": [{"path": str(FAMILY["sft_a"]), "weight": 0.5},
                                     {"path": str(FAMILY["sft_b"]), "weight": 0.5}]},
        }
        for k in drop:
            data.pop(k)
        if change:
            out = change(data, d)
            data = out if out is not None else data
        (d / name).write_text(yaml.safe_dump(data) if isinstance(data, dict) else data)
    return setup


def set_(**kv):
    def change(data, d):
        data.update(kv)
    return change


def out_is_ppo_config(data, d):
    (d / "ppo.yaml").write_text(PPO.read_text())
    data.update(out=str(d / "ppo.yaml"), ppo_config=str(d / "ppo.yaml"))


SWEEP = ["rlhf", "sweep", "{d}/sweep.yaml"]

SWEEP_CASES = [
    Case("sweep_file_missing", ["rlhf", "sweep", "{d}/nope.yaml"], "nope.yaml"),
    Case("sweep_yaml_syntax", SWEEP, "sweep.yaml:3:1: YAML syntax error", sweep(raw="out: x\nmerge: {method: bai\n")),
    Case("sweep_yaml_tab", SWEEP, "tabs", sweep(raw="merge:\n\tmethod: bai\n")),
    Case("sweep_not_mapping", SWEEP, "must be a mapping", sweep(raw="- out\n- merge\n")),
    Case("sweep_unknown_key", SWEEP, "ratios: unknown key", sweep(set_(ratios=[0.1]))),
    Case("sweep_missing_out", SWEEP, "out: missing", sweep(drop=["out"])),
    Case("sweep_missing_merge", SWEEP, "merge: missing", sweep(drop=["merge"])),
    Case("max_concurrent_many", SWEEP, "max_concurrent: expected int, got 'many'", sweep(set_(max_concurrent="many"))),
    Case("max_concurrent_zero", SWEEP, "max_concurrent: must be in [1, 1024]", sweep(set_(max_concurrent=0))),
    Case("launcher_slurm", SWEEP, "launcher: must be one of 'local', 'ray_jobs'", sweep(set_(launcher="slurm"))),
    Case("ray_jobs_no_address", SWEEP, "ray_address: required", sweep(set_(launcher="ray_jobs"))),
    Case("merge_not_mapping", SWEEP, "merge: expected a mapping", sweep(set_(merge=[1, 2]))),
    Case("merge_not_bai", SWEEP, "merge: must be a bai recipe",
         sweep(lambda data, d: data["merge"].update(method="linear"))),
    Case("merge_alpha_out_of_range", SWEEP, "merge.alphas[1]",
         sweep(lambda data, d: data["merge"].update(alphas=[0.1, 1.5]))),
    Case("ppo_config_missing", SWEEP, "ppo_config: file does not exist", sweep(set_(ppo_config="nope.yaml"))),
    Case("ppo_config_not_text", SWEEP, "ppo_config: expected str", sweep(set_(ppo_config=5))),
    Case("overrides_not_list", SWEEP, "overrides: expected a list", sweep(set_(overrides="trainer.total_steps=2"))),
    Case("override_without_equals", SWEEP, "overrides[0]: expected key.sub=value", sweep(set_(overrides=["seed"]))),
    Case("axes_not_list", SWEEP, "axes.ppo.kl_coef", sweep(set_(axes={"ppo.kl_coef": 0.1}))),
    Case("axes_empty_list", SWEEP, "axes.ppo.kl_coef", sweep(set_(axes={"ppo.kl_coef": []}))),
    Case("point_config_invalid", SWEEP, "point alpha_0.1: ppo.kl_kind", sweep(set_(overrides=["ppo.kl_kind=k9"]))),
    Case("point_axis_invalid", SWEEP, "point alpha_0.1__ppo.gamma=-1.0: ppo.gamma",
         sweep(set_(axes={"ppo.gamma": [-1.0]}))),
    Case("cli_override_without_equals", SWEEP + ["seed"], "command-line override[0]", sweep()),
    Case("out_empty", SWEEP, "out: must be a directory path", sweep(set_(out=""))),
    Case("out_user_dir", SWEEP, "was not written by `rlhf sweep`",
         both(sweep(), mkdir_with("out"))),
    Case("out_user_dir_force", SWEEP + ["--force"], "was not written by `rlhf sweep`",
         both(sweep(), mkdir_with("out"))),
    Case("out_is_ppo_config", SWEEP, "is the input", sweep(out_is_ppo_config)),
    Case("out_contains_sweep_file", SWEEP, "contains the input", sweep(set_(out="."))),
    Case("out_inside_base_model", SWEEP + ["--force"], "lies inside the input",
         sweep(lambda data, d: data.update(out=str(Path(FAMILY["base"]) / "sweep_out")))),
    Case("point_unknown", SWEEP + ["--point", "alpha_0.7"], "--point: no point named 'alpha_0.7'", sweep()),
    Case("max_runs_zero", SWEEP + ["--max-runs", "0"], "--max-runs: must be >= 1", sweep()),
    Case("max_runs_text", SWEEP + ["--max-runs", "two"], "invalid int value: 'two'", sweep()),
]

CASES = REPORT_CASES + SWEEP_CASES


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, tiny_family, tmp_path, capsys, monkeypatch):
    FAMILY.update(tiny_family)
    run_case(case, tmp_path / "case", capsys, monkeypatch)
    assert not (Path(tiny_family["base"]) / "sweep_out").exists()


def test_case_count():
    assert len(REPORT_CASES) >= 25 and len(SWEEP_CASES) >= 25
