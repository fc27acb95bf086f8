"""`rlhf` command line. Entry points live in this package, one module per subcommand (argument
parsing and the last line printed, nothing else); the library they call lives beside it in
``rlhf`` (``rlhf.trainer``, ``rlhf.sft``, ...). A subcommand's module is imported only when used."""

from __future__ import annotations

from bairlhf.cli import dispatch

# subcommand -> (module:function taking argv, one-line help)
COMMANDS = {
    "demo": ("rlhf.cli.demo:main", "run the README's end-to-end CPU demo"),
    "train": ("rlhf.cli.train:main", "run PPO from a YAML config (dotted overrides, --resume RUN_DIR)"),
    "report": ("rlhf.cli.report:main", "figures and tables from one or more run directories"),
    "sft": ("rlhf.cli.sft:main", "supervised fine-tuning (full or LoRA) on DeepSpeed"),
    "rm": ("rlhf.cli.rm:main", "Bradley-Terry reward model training on DeepSpeed"),
    "sweep": ("rlhf.cli.sweep:main", "BAI ratio sweep: one-pass merge, one PPO run per point, comparison"),
    "plan": ("rlhf.cli.plan:main", "memory and step-time plan for a config on a GPU cluster"),
    "testbed": ("rlhf.cli.testbed:main", "the CPU model organism of PPO instabilities"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("rlhf", COMMANDS, argv)

