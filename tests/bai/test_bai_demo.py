"""`rlhf demo` (interim: tiny checkpoints -> one-pass BAI sweep -> load a merged model)."""

from rlhf import cli


def test_demo_runs(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "9 checkpoints" in out and "AutoModelForCausalLM" in out
    sweep = tmp_path / "demo" / "bai_sweep"
    assert sorted(p.name for p in sweep.iterdir()) == [f"alpha_0.{i}" for i in range(1, 10)]
