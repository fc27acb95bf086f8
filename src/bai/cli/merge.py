"""`bai merge`: merge checkpoints from a YAML recipe (library: ``bai.merge``)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bai.merge import merge


def main(argv: list[str] | None = None) -> int:
    """CLI: ``bai merge CONFIG.yaml --out DIR [--force] [--no-progress]``; bad input raises a
    ``UserError``, which ``bairlhf.cli.dispatch`` prints as one line (exit code 2)."""
    ap = argparse.ArgumentParser(prog="bai merge", description="Merge Hugging Face checkpoints from a YAML "
                                 "recipe (bai, linear, task_arithmetic, ties, dare_linear, dare_ties, slerp).")
    ap.add_argument("config", help="merge recipe (YAML); see configs/merge/")
    ap.add_argument("--out", required=True, help="output checkpoint directory (a sweep writes DIR/alpha_<a>)")
    ap.add_argument("--force", action="store_true", help="replace an earlier output of `bai merge` at DIR, "
                    "once the new one is complete (never a directory another command or you wrote)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    dirs = merge(args.config, args.out, force=args.force, progress=not args.no_progress)
    out = Path(os.path.expanduser(args.out)).resolve()
    for d in dirs if dirs != [out] else []:
        print(f"  {d}")
    what = f"{len(dirs)} checkpoint{'s' * (len(dirs) > 1)}"
    if dirs != [out]:
        what += f" ({', '.join(d.name for d in dirs)})"
    print(f"bai merge: wrote {what} to {out} in {time.perf_counter() - t0:.1f}s")
    return 0
