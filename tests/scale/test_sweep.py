"""`rlhf sweep` on CPU: tiny BAI family, 3 ratios merged in one pass, 3 real PPO runs (Ray +
DeepSpeed), an interrupted sweep resumed, Table 2-style summary and overlaid figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from rlhf import sweep as S
from rlhf.cli import sweep as sweep_cli
from rlhf.cli import main as rlhf_main

ROOT = Path(__file__).resolve().parents[2]


def sweep_yaml(tmp_path: Path, family: dict, **extra) -> Path:
    data = {
        "out": str(tmp_path / "sweep"),
        "ppo_config": str(ROOT / "configs" / "ppo" / "tiny_cpu.yaml"),
        "overrides": ["trainer.total_steps=2", "trainer.save_every=2", "trainer.probe_every=0",
                      "ppo.rollout_batch_size=8", "ppo.mini_batch_size=8", "ppo.micro_batch_size=8",
                      "ppo.ppo_epochs=1", "rollout.max_new_tokens=8"],
        "merge": {"method": "bai", "base": str(family["base"]), "dtype": "float32", "alphas": [0.1, 0.5, 0.9],
                  "sft_models": [{"path": str(family["sft_a"]), "weight": 0.5},
                                 {"path": str(family["sft_b"]), "weight": 0.5}]},
        **extra,
    }
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(data))
    return f


def test_bad_input_stops_before_any_work(tmp_path, tiny_family, capsys):
    f = sweep_yaml(tmp_path, tiny_family, overrides=["ppo.kl_kind=k9"])
    assert rlhf_main(["sweep", str(f)]) == 2
    assert "point alpha_0.1: ppo.kl_kind" in capsys.readouterr().err
    f = sweep_yaml(tmp_path, tiny_family, launcher="slurm")
    assert rlhf_main(["sweep", str(f)]) == 2 and "launcher" in capsys.readouterr().err
    f = sweep_yaml(tmp_path, tiny_family, ratios=[0.1])
    assert rlhf_main(["sweep", str(f)]) == 2 and "ratios: unknown key" in capsys.readouterr().err
    data = yaml.safe_load(f.read_text())
    data.pop("ratios")
    data["merge"]["alphas"] = [0.1, 1.5]
    f.write_text(yaml.safe_dump(data))
    assert rlhf_main(["sweep", str(f)]) == 2 and "merge.alphas[1]" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_points_and_dry_run(tmp_path, tiny_family, capsys):
    f = sweep_yaml(tmp_path, tiny_family, axes={"ppo.kl_coef": [0.0, 0.01]})
    sw = S.load_sweep(f, ["cluster.address=head:6379"])
    assert [p.name for p in sw.points][:2] == ["alpha_0.1__ppo.kl_coef=0.0", "alpha_0.1__ppo.kl_coef=0.01"]
    assert len(sw.points) == 6
    assert sweep_cli.main([str(f), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("[todo]") == 6 and "models/alpha_0.9 model.bai_recipe=null" in out
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_sweep_three_ratios_resumes_and_compares(tmp_path, tiny_family):
    import ray

    f = sweep_yaml(tmp_path, tiny_family)
    sw = S.load_sweep(f)
    try:
        ran = S.run_sweep(sw, f, max_runs=2)          # an interrupted sweep: 2 of 3 runs
        assert ran == ["alpha_0.1", "alpha_0.5"]
        assert not (sw.out / "summary.md").exists()
        assert sweep_cli.main([str(f)]) == 0                  # resumes: only the last run
        assert S.run_sweep(S.load_sweep(f)) == []     # nothing left
    finally:
        if ray.is_initialized():
            ray.shutdown()
    # one-pass merge wrote every ratio; alpha is the base model's weight
    m = sw.model_dir(0.5)
    name = "model.layers.0.mlp.up_proj.weight"

    def tensor(d):
        idx = json.loads((Path(d) / "model.safetensors.index.json").read_text())["weight_map"]
        return load_file(str(Path(d) / idx[name]))[name]

    want = 0.5 * tensor(tiny_family["base"]) + 0.25 * tensor(tiny_family["sft_a"]) + 0.25 * tensor(tiny_family["sft_b"])
    assert (tensor(m) - want).abs().max() < 1e-6
    for p in sw.points:
        run = sw.run_dir(p)
        assert (run / S.DONE).exists()
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["model"]["actor"] == str(sw.model_dir(p.alpha))
        steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
        assert steps[-1] == 2
    summary = (sw.out / "summary.md").read_text()
    assert "| | α=0.1, β=0.9 | α=0.5, β=0.5 | α=0.9, β=0.1 |" in summary
    assert "| final reward |" in summary and "| hockey stick |" in summary
    for fig in ("reward_buckets.png", "reward.png", "length.png", "kl.png", "summary.md"):
        assert (sw.out / "report" / fig).stat().st_size > 0


def test_out_ownership(tmp_path, tiny_family, capsys):
    """OUT is the sweep's own: rerun resumes into it, --force replaces only an earlier sweep output,
    and an OUT that is / contains / lies inside an input, or someone else's directory, is refused."""
    f = sweep_yaml(tmp_path, tiny_family)
    sw = S.load_sweep(f)
    assert S.prepare_out(sw) is False and (sw.out / ".bai-rlhf-output.json").exists()
    (sw.out / "runs").mkdir()
    (sw.out / "runs" / "keep.txt").write_text("x")
    assert S.prepare_out(sw) is True and (sw.out / "runs" / "keep.txt").exists()      # resume: kept
    assert S.prepare_out(sw, force=True) is False and not (sw.out / "runs").exists()  # afresh: ours only
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.txt").write_text("user data")
    for out, word in [(mine, "was not written by `rlhf sweep`"), (tiny_family["base"], "is the input"),
                      (Path(tiny_family["base"]) / "sub", "lies inside the input"), (tmp_path, "contains the input")]:
        (tmp_path / "cfgs" / out.name).mkdir(parents=True)
        g = sweep_yaml(tmp_path / "cfgs" / out.name, tiny_family, out=str(out))
        for force in ([], ["--force"]):
            capsys.readouterr()
            assert rlhf_main(["sweep", str(g), *force]) == 2, out
            err = capsys.readouterr().err
            assert word in err and err.count("\n") == 1, err
    assert (mine / "data.txt").read_text() == "user data" and sorted(p.name for p in mine.iterdir()) == ["data.txt"]
    assert not (Path(tiny_family["base"]) / "sub").exists()
