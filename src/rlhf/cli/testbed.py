"""`rlhf testbed`: the CPU model organism of PPO instabilities (library: ``rlhf.testbed``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import rlhf.testbed.build as _lib
from bairlhf.errors import UserError
from rlhf.testbed.build import BuildError, BuildSpec, LONG, MODELS, SMALL, build, check_out, check_spec


def build_main(argv: list[str] | None = None) -> int:
    """``rlhf testbed build [--out DIR] [--small | --long] [--seed N] [--arch llama|qwen2] [--force]``.

    Bad input raises ``BuildError`` before anything is written (one line at the CLI boundary).
    Exit code 0, or 1 when the linear-connectivity check is not met."""
    ap = argparse.ArgumentParser(prog="rlhf testbed build", description=_lib.__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/testbed", help="cache directory (default: runs/testbed)")
    ap.add_argument("--small", action="store_true", help="CI-sized build (a couple of minutes)")
    ap.add_argument("--long", action="store_true", help="long-trace variant (8-15 digits with a verification pass)")
    ap.add_argument("--seed", type=int, default=0, help="data and initialization seed (>= 0)")
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    ap.add_argument("--no-connectivity", action="store_true", help="skip the merge sweeps")
    ap.add_argument("--force", action="store_true",
                    help="rebuild an earlier build of this command made with a different spec")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, >= 1 (tiny models: 1 is usually fastest)")
    args = ap.parse_args(argv)
    if args.small and args.long:
        raise BuildError("--small, --long: choose one preset")
    if args.seed < 0:
        raise BuildError(f"--seed: expected an integer >= 0, got {args.seed}")
    if args.threads < 1:
        raise BuildError(f"--threads: expected an integer >= 1, got {args.threads}")
    kw = dict(SMALL) if args.small else {}
    if args.long:
        kw.update(LONG)
    spec = BuildSpec(arch=args.arch, seed=args.seed, **kw)
    check_spec(spec)
    check_out(args.out, spec, args.force)  # before torch and the first write
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    report = build(args.out, spec, force=args.force, check_connectivity=not args.no_connectivity)
    out = Path(args.out)
    print((out / "build_report.md").read_text())
    connected = report.get("connected", True)
    print(f"rlhf testbed build: wrote {out}/ (tokenizer/, data/, models/{{{','.join(MODELS)}}}/, "
          f"build_report.md and .json)" + ("" if connected else "; linear connectivity NOT met (exit code 1)"))
    return 0 if connected else 1


USAGE = """usage: rlhf testbed COMMAND [ARGS]

commands:
  build      synthesize data, train base/instruct/reasoning/mix models and the reward model (cached),
             check linear connectivity along merge sweeps  (rlhf testbed build --help)
"""


def main(argv: list[str] | None = None) -> int:
    """``rlhf testbed COMMAND [ARGS]``: one subcommand today, ``build``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] == "build":
        return build_main(argv[1:])
    raise UserError(f"unknown command {argv[0]!r}; commands: build (see `rlhf testbed --help`)")
