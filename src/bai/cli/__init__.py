"""`bai` command line: merges, sweeps and calibration. One module per subcommand in this package
(``bai.cli.merge``); ``bai calibrate`` is dispatched by name to ``rlhf.cli.calibrate`` (it trains
with ``rlhf.sft``), so ``bai`` itself imports no ``rlhf``."""

from __future__ import annotations

from bairlhf.cli import dispatch

COMMANDS = {
    "merge": ("bai.cli.merge:main", "merge checkpoints from a YAML recipe (BAI two-stage, linear, TIES, DARE, SLERP...)"),
    "calibrate": ("rlhf.cli.calibrate:main", "SFT with an empty reasoning trace, then merge back at the calibrated ratio"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("bai", COMMANDS, argv)

