"""`bai calibrate`: SFT with an empty reasoning trace, then merge back (library: ``rlhf.calibrate``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bairlhf.yamlio import load_mapping
from rlhf.calibrate.config import load_config
from rlhf.calibrate.pipeline import _fmt, run


def main(argv: list[str] | None = None) -> int:
    """``bai calibrate CONFIG.yaml --out DIR [--force]``; bad input raises a ``UserError``, which
    ``bairlhf.cli.dispatch`` prints as one line (exit code 2)."""
    ap = argparse.ArgumentParser(prog="bai calibrate",
                                 description="SFT with an empty reasoning trace, then merge back at the largest "
                                             "SFT weight whose calibration reasoning rate stays >= rho_min")
    ap.add_argument("config", help="YAML config (see configs/calibrate/)")
    ap.add_argument("--out", required=True, help="run directory (written when the run is complete; an "
                    "unfinished run of the same config is resumed after its SFT step)")
    ap.add_argument("--force", action="store_true", help="redo an earlier `bai calibrate` run at DIR from the "
                    "start (the old one is replaced once the new one is complete)")
    args = ap.parse_args(argv)
    cfg = load_config(load_mapping(args.config, "calibrate config"), "config")
    report = run(cfg, args.out, force=args.force, config_file=args.config)
    out = Path(os.path.expanduser(args.out)).resolve()
    print(f"bai calibrate: alpha* (sft_weight) = {report['sft_weight']:.4f}, rho = "
          f"{_fmt(report['rho_at_sft_weight'])}; wrote the run (model/, report.md, probes.csv, sft/) to {out}")
    return 0
