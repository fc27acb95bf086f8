"""`rlhf` command line: one subcommand per module, imported only when used."""

from __future__ import annotations

import sys

from bairlhf.cli import dispatch

# subcommand -> (module:function taking argv, one-line help)
COMMANDS = {
    "demo": ("rlhf.demo:main", "run the README's end-to-end CPU demo"),
    "train": ("rlhf.trainer:cli_main", "run PPO from a YAML config (dotted overrides, --resume RUN_DIR)"),
    "report": ("rlhf.report:main", "figures and tables from one or more run directories"),
    "sft": ("rlhf.sft:main", "supervised fine-tuning (full or LoRA) on DeepSpeed"),
    "rm": ("rlhf.rm:main", "Bradley-Terry reward model training on DeepSpeed"),
    "sweep": ("rlhf.sweep:main", "BAI ratio sweep: one-pass merge, one PPO run per point, comparison"),
    "plan": ("rlhf.plan:main", "memory and step-time plan for a config on a GPU cluster"),
    "testbed": ("rlhf.testbed:main", "the CPU model organism of PPO instabilities"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("rlhf", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
