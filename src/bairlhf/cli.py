"""The command dispatcher of ``bai`` and ``rlhf``, and their one error boundary.

``dispatch(prog, commands, argv)`` imports the subcommand's module only when used and runs it.
A ``UserError`` (bad input) anywhere below becomes one line ``PROG CMD: message`` on stderr and
exit code 2, with no traceback; a ``KeyboardInterrupt`` exits 130. Everything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys

from bairlhf.errors import UserError


def dispatch(prog: str, commands: dict, argv: list[str] | None = None) -> int:
    """``commands``: subcommand -> ("module:function taking argv", one-line help)."""
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
    try:
        return int(getattr(mod, func)(rest) or 0)
    except UserError as e:
        print(f"{prog} {name}: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog} {name}: interrupted", file=sys.stderr)
        return 130


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line."""
    return " ".join(str(e).split("\n")).strip() or type(e).__name__
