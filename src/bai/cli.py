"""`bai` command line: merges, sweeps and calibration."""

from __future__ import annotations

import sys

from bairlhf.cli import dispatch

COMMANDS = {
    "merge": ("bai.merge:main", "merge checkpoints from a YAML recipe (BAI two-stage, linear, TIES, DARE, SLERP...)"),
    "calibrate": ("rlhf.calibrate:main", "SFT with an empty reasoning trace, then merge back at the calibrated ratio"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("bai", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
