"""`rlhf report`: figures and tables from run directories (drawn by ``rlhf.report``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import rlhf.report as _lib
from rlhf.report import FIGURES, ReportError, write_report


class _ArgParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``UserError`` line (the CLI boundary prints it)."""

    def error(self, message: str):
        raise ReportError(f"{message} (see rlhf report --help)")


def main(argv: list[str] | None = None) -> int:
    ap = _ArgParser(prog="rlhf report", description=_lib.__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (metrics.jsonl, config.yaml)")
    ap.add_argument("--out", required=True, help="output directory for the PNG figures and summary.md")
    ap.add_argument("--force", action="store_true",
                    help="replace an existing --out directory written by an earlier rlhf report (only that)")
    ns = ap.parse_args(argv)
    out = write_report([Path(r) for r in ns.runs], Path(ns.out), force=ns.force)
    print(f"rlhf report: wrote {out}/ ({', '.join(FIGURES)})")
    return 0
