"""`rlhf` command line: one subcommand per module, imported only when used."""

from __future__ import annotations

import importlib
import sys

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


def dispatch(prog: str, commands: dict, argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} COMMAND [ARGS]\n\ncommands:")
        for name, (_, help_) in commands.items():
            print(f"  {name:<10} {help_}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"{prog}: unknown command {name!r}; run '{prog} --help'", file=sys.stderr)
        return 2
    module, func = commands[name][0].split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            print(f"{prog} {name}: not available in this version", file=sys.stderr)
            return 2
        raise
    return int(getattr(mod, func)(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    return dispatch("rlhf", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
