"""The CPU model organism of PPO instabilities (``rlhf testbed``); see docs/testbed.md.

``rlhf testbed build [...]`` synthesizes the addition task's data and trains the organism's
models with ``rlhf sft`` and ``rlhf rm`` (``rlhf.testbed.build``); PPO runs on them with
``rlhf train configs/testbed/*.yaml``.
"""

from __future__ import annotations

import sys

USAGE = """usage: rlhf testbed COMMAND [ARGS]

commands:
  build      synthesize data, train base/instruct/reasoning/mix models and the reward model (cached),
             check linear connectivity along merge sweeps  (rlhf testbed build --help)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] == "build":
        from rlhf.testbed.build import main as build_main

        return build_main(argv[1:])
    from bairlhf.errors import UserError

    raise UserError(f"unknown command {argv[0]!r}; commands: build (see `rlhf testbed --help`)")
