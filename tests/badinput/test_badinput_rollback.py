"""Bad input to `rlhf train` in the ``rollback`` action's keys (``metrics.on_*: rollback``,
``metrics.rollback_*``): ranges and choices of the typed config, and what the run cannot carry out
(no checkpoints to go back to, a KL coefficient of 0 to multiply, a merge on the megatron actor).
One line naming the key, exit 2, before any work (no run directory, no tiny model, no config.yaml)."""

from __future__ import annotations

import pytest

from tests.badinput.harness import Case, run_case

T = ["rlhf", "train"]
RB = T + ["metrics.on_collapse_warning=rollback"]

CASES = [
    Case("on-collapse-unknown", T + ["metrics.on_collapse=restart"], "metrics.on_collapse: must be one of"),
    Case("rollback-change-unknown", RB + ["metrics.rollback_change=temperature"],
         "metrics.rollback_change: must be one of"),
    Case("rollback-kl-factor-zero", RB + ["metrics.rollback_kl_factor=0"], "metrics.rollback_kl_factor: must be > 0"),
    Case("rollback-kl-factor-text", RB + ["metrics.rollback_kl_factor=double"], "metrics.rollback_kl_factor"),
    Case("rollback-lr-factor-negative", RB + ["metrics.rollback_lr_factor=-0.5"],
         "metrics.rollback_lr_factor: must be > 0"),
    Case("rollback-lr-factor-inf", RB + ["metrics.rollback_lr_factor=.inf"], "metrics.rollback_lr_factor"),
    Case("rollback-merge-ratio-zero", RB + ["metrics.rollback_merge_ratio=0"], "metrics.rollback_merge_ratio"),
    Case("rollback-merge-ratio-above-one", RB + ["metrics.rollback_merge_ratio=1.5"], "metrics.rollback_merge_ratio"),
    Case("rollback-max-zero", RB + ["metrics.rollback_max=0"], "metrics.rollback_max: must be >= 1"),
    Case("rollback-max-float", RB + ["metrics.rollback_max=1.5"], "metrics.rollback_max"),
    Case("rollback-fallback-rollback", RB + ["metrics.rollback_fallback=rollback"],
         "metrics.rollback_fallback: must be one of"),
    Case("rollback-without-checkpoints", T + ["metrics.on_collapse=rollback", "trainer.save_every=0"],
         "metrics.on_collapse: rollback goes back to the last checkpoint"),
    Case("rollback-kl-with-kl-coef-zero", RB + ["ppo.kl_coef=0"], "metrics.rollback_kl_factor: ppo.kl_coef is 0"),
    Case("rollback-merge-on-megatron", RB + ["metrics.rollback_change=merge", "engine.actor=megatron"],
         "metrics.rollback_change: merge"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_rollback_bad_input(case, tmp_path, capsys, monkeypatch):
    run_case(case, tmp_path, capsys, monkeypatch)
