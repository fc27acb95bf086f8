"""`rlhf report` on synthetic run directories written by the real MetricLogger."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import yaml

from rlhf.cli import main as rlhf_main
from rlhf.metrics import MetricLogger, StabilityMonitor, batch_metrics
from rlhf.report import run_label

STEPS = 80
HAVE_WANDB = importlib.util.find_spec("wandb") is not None


def _write_run(run_dir, collapse: bool, config: dict | None, steps=STEPS):
    import torch

    rng = np.random.default_rng(0 if collapse else 1)
    if config is not None:
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    logger = MetricLogger(run_dir, monitor=StabilityMonitor({"bucket_width": 10, "num_buckets": 4}), tensorboard=False)
    for step in range(steps):
        mean_len = 30 if (not collapse or step < 10) else 8
        lengths = torch.tensor(np.clip(rng.normal(mean_len, 6, 64), 1, 40).astype(int))
        dip = -1.0 if collapse and 10 <= step < 40 else 0.0
        scores = torch.tensor(rng.normal(dip + 0.01 * max(0, step - 40), 1.0, 64))
        mask = (torch.arange(40)[None, :] < lengths[:, None]).float()
        m = batch_metrics(mask=mask, scores=scores, finished=lengths < 40, bucket_width=10, num_buckets=4)
        m["kl/policy_vs_sampling"] = 1e-3 * rng.random()
        logger.log(step, m)
    logger.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    sft = root / "sft_only"
    bai = root / "bai_05"
    _write_run(sft, True, {"model": {"actor": "/ckpt/distill_sft"}, "metrics": {"bucket_width": 10, "num_buckets": 4}})
    _write_run(bai, False, {"model": {"actor": "/merges/bai/alpha_0.5"}, "metrics": {"bucket_width": 10,
                                                                                     "num_buckets": 4}})
    return sft, bai


def test_report_figures_and_summary(runs, tmp_path, capsys):
    import matplotlib.image as mpimg

    out = tmp_path / "report"
    assert rlhf_main(["report", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    for name in ("reward_buckets.png", "reward.png", "length.png", "kl.png"):
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, name
    summary = (out / "summary.md").read_text()
    assert "| distill_sft | 79 |" in summary and "| BAI merge (α=0.5, β=0.5) | 79 |" in summary
    sft_row = [ln for ln in summary.splitlines() if ln.startswith("| distill_sft |")][0]
    assert "| collapsed |" in sft_row and "hockey_stick" in sft_row
    bai_row = [ln for ln in summary.splitlines() if ln.startswith("| BAI merge")][0]
    assert "| none | no_drop |" in bai_row
    assert "length [10, 20)" in summary and "length >= 30" in summary
    assert not list(tmp_path.glob(".report.*"))          # no temporary sibling left behind


def test_report_refuses_bad_input_before_writing(runs, tmp_path, capsys):
    out = tmp_path / "r"
    assert rlhf_main(["report", str(runs[0]), str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "nope/metrics.jsonl" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    assert rlhf_main(["report", str(runs[0]), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    # --force replaces only an earlier report: a directory the user made is kept as it is
    assert rlhf_main(["report", str(runs[0]), "--out", str(out), "--force"]) == 2
    assert "was not written by `rlhf report`" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "user data" and not (out / "summary.md").exists()


def _tree(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())


def test_report_force_replaces_only_its_own_output_never_a_run(runs, tmp_path, capsys):
    out = tmp_path / "rep"
    assert rlhf_main(["report", str(runs[0]), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"rlhf report: wrote {out}/")
    assert rlhf_main(["report", str(runs[1]), "--out", str(out), "--force"]) == 0    # its own output: replaced
    assert "BAI merge" in (out / "summary.md").read_text()
    before = _tree(runs[0])
    for bad, word in [(runs[0], "is the input"), (runs[0] / "figs", "lies inside the input"),
                      (runs[0].parent, "contains the input")]:
        capsys.readouterr()
        assert rlhf_main(["report", str(runs[0]), "--out", str(bad), "--force"]) == 2, bad
        assert word in capsys.readouterr().err, bad
    assert _tree(runs[0]) == before and not (runs[0] / "figs").exists()     # the run is untouched


def test_report_force_replaces_an_unmarked_report_of_older_versions(runs, tmp_path, capsys):
    old = tmp_path / "old"
    old.mkdir()
    for name in ("summary.md", "reward.png"):
        (old / name).write_text("old report")
    assert rlhf_main(["report", str(runs[0]), "--out", str(old), "--force"]) == 0
    assert (old / "summary.md").read_text().startswith("# Run report")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "summary.md").write_text("old")
    (tmp_path / "mixed" / "notes.txt").write_text("mine")           # not only report files: refused
    assert rlhf_main(["report", str(runs[0]), "--out", str(tmp_path / "mixed"), "--force"]) == 2
    assert (tmp_path / "mixed" / "notes.txt").read_text() == "mine"


def test_report_on_a_live_run_with_a_partial_line(tmp_path, capsys):
    live = tmp_path / "live"
    _write_run(live, True, None, steps=25)
    with open(live / "metrics.jsonl", "a") as f:
        f.write('{"step": 25, "reward/me')
    assert rlhf_main(["report", str(live), "--out", str(tmp_path / "o")]) == 0
    assert "| live | 24 |" in (tmp_path / "o" / "summary.md").read_text()
    err = capsys.readouterr().err
    assert "metrics.jsonl:26: incomplete last line skipped" in err     # tolerated, but said


def test_report_corrupt_middle_line_is_an_error_naming_the_line(tmp_path, capsys):
    run = tmp_path / "run"
    _write_run(run, True, None, steps=12)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[4] = lines[4][:30]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert rlhf_main(["report", str(run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl:5: not a JSON line" in err[0] and not (tmp_path / "o").exists()


def test_run_label_sources(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "bai", "alpha": 0.7, "base": "b", "sft_models": []}))
    label = run_label(tmp_path / "r1", {"model": {"actor": "tiny", "bai_recipe": str(recipe)}})
    assert label == "BAI merge (α=0.7, β=0.3)"
    assert run_label(tmp_path / "r2", {"actor": {"init": "/m/sft", "ratio": 0.2}}) == "sft (α=0.2, β=0.8)"
    assert run_label(tmp_path / "r3", {}) == "r3"
    assert run_label(tmp_path / "r4", {"model": {"actor": "out/models/alpha_0.25/"}}) == "BAI merge (α=0.25, β=0.75)"


def test_length_heatmap_shows_the_collapse(runs, tmp_path, capsys):
    import matplotlib.image as mpimg

    from rlhf.report import length_counts, load_run

    out = tmp_path / "report"
    assert rlhf_main(["report", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    img = mpimg.imread(out / "length_heatmap.png")
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
    run = load_run(runs[0])                                   # the collapsing run (length 30 -> 8 at step 10)
    steps, edges, counts = length_counts(run)
    assert list(steps) == list(range(STEPS)) and counts.shape == (4, STEPS)
    top = max(r["rollout/length_max"] for r in run.records) + 1
    assert list(edges) == [0, 10, 20, 30, top]                # the open-ended last bucket closed at max + 1
    assert (counts.sum(0) == 64).all()                        # every response of every step counted once
    centre = (counts * np.array([5, 15, 25, 35])[:, None]).sum(0) / 64
    assert centre[:10].min() > 22 and centre[12:].max() < 12  # the mass slides down at the collapse


def test_summary_shows_the_preflight_length_bias(tmp_path, capsys):
    from rlhf.metrics.preflight import preflight_length_bias

    run_dir = tmp_path / "biased"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"metrics": {"bucket_width": 10}}))   # bucket labels
    with MetricLogger(run_dir, tensorboard=False) as logger:
        for step in range(1, 6):
            m = {"reward/mean": 0.1 * step, "reward/std": 1.0, "rollout/length_mean": 25.0}
            if step == 1:                                     # the first batch: a reward preferring short answers
                m.update(preflight_length_bias([10, 20, 30, 40], [4, 3, 2, 1], bucket_width=10))
            logger.log(step, m)
    out = tmp_path / "rep"
    assert rlhf_main(["report", str(run_dir), "--out", str(out)]) == 0
    summary = (out / "summary.md").read_text()
    assert "the reward scores responses over 25 tokens 1.79 std below shorter ones" in summary
    assert "| score-length correlation (Pearson / Spearman) | -1 / -1 |" in summary
    assert "| long - short score gap (reward std / reward units) | -1.79 / -2 |" in summary
    assert "| mean score, length [10, 20) | 4 |" in summary
    assert (out / "length_heatmap.png").exists()              # drawn even without bucket counts (a note)


@pytest.mark.slow
def test_trainer_buckets_follow_the_metrics_config_into_metrics_and_report(tmp_path, capsys, monkeypatch):
    """metrics.bucket_width / num_buckets reach the trainer's batch_metrics (issue 12): a tiny run
    with width 7 and 5 buckets logs exactly bucket_00..04, placed by length, and the report labels
    them by 7s (not the defaults' 100 x 20)."""
    import json
    import re

    import ray

    from rlhf.config import load_config
    from rlhf.trainer import train

    monkeypatch.chdir(tmp_path)          # not the checkout: reward modules come from the installed package
    run_dir = tmp_path / "run"
    cfg = load_config(None, [f"run_dir={run_dir}", "trainer.total_steps=2", "trainer.save_every=2",
                             "trainer.probe_every=0", "rollout.max_new_tokens=32", "ppo.ppo_epochs=1",
                             "metrics.bucket_width=7", "metrics.num_buckets=5", "metrics.bucket_min_count=1",
                             f"trainer.loggers=[jsonl,tensorboard{',wandb' if HAVE_WANDB else ''}]"])   # issue 15
    monkeypatch.setenv("WANDB_MODE", "offline")                                 # no network, no login
    assert (cfg.metrics.bucket_width, cfg.metrics.num_buckets) == (7, 5)
    try:
        train(cfg)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        counts = {k: v for k, v in r.items() if k.startswith("reward/bucket_") and k.endswith("_count")}
        assert sorted(counts) == [f"reward/bucket_{i:02d}_count" for i in range(5)], sorted(counts)
        assert sum(counts.values()) == r["rollout/num_responses"]
        used = [i for i in range(5) if counts[f"reward/bucket_{i:02d}_count"] > 0]
        assert used[0] == min(int(r["rollout/length_min"]) // 7, 4)
        assert used[-1] == min(int(r["rollout/length_max"]) // 7, 4)
    out = tmp_path / "rep"
    assert rlhf_main(["report", str(run_dir), "--out", str(out)]) == 0
    summary = (out / "summary.md").read_text()
    label = re.compile(r"\| (length (\[\d+, \d+\)|>= \d+)) \|")
    labels = {m.group(1) for ln in summary.splitlines() if (m := label.match(ln))}
    want = {f"length [{7 * i}, {7 * i + 7})" for i in range(4)} | {"length >= 28"}
    assert labels and labels <= want, labels
    # issue 15: the pre-flight length-bias check of the first batch: logged in the first record,
    # printed by the trainer, shown in the report; the length heatmap; the offline W&B run
    first = recs[0]
    for key in ("stability/preflight_len_score_corr", "stability/preflight_len_score_spearman",
                "stability/preflight_long_short_gap_std", "stability/preflight_threshold"):
        assert key in first and key not in recs[1], key
    assert first["stability/preflight_num_responses"] == first["rollout/num_responses"]
    assert -1 <= (first["stability/preflight_len_score_corr"] or 0) <= 1
    assert "pre-flight length bias:" in capsys.readouterr().err
    assert "Pre-flight (first batch, before any update): pre-flight length bias:" in summary
    assert (out / "length_heatmap.png").exists()
    if HAVE_WANDB:   # the `wandb` extra (in `test`): one offline W&B run holding the logged keys
        wandb_runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(wandb_runs) == 1 and b"stability/preflight_len_score_corr" in wandb_runs[0].read_bytes()
        assert b"rollout/length_hist" in wandb_runs[0].read_bytes()
