"""The command dispatcher of ``bai`` and ``rlhf``, and their one error boundary.

``dispatch(prog, commands, argv)`` imports the subcommand's module only when used and runs it.
A ``UserError`` (bad input) anywhere below becomes one line ``PROG CMD: message`` on stderr and
exit code 2, with no traceback; so does a bad command-line argument that a command's
``argparse`` parser rejects (its usage text is not repeated: ``PROG CMD --help`` shows it). A
``KeyboardInterrupt`` exits 130. Everything else is a bug and keeps its traceback.

Global flags, before the command: ``--verbose`` (or ``BAI_RLHF_VERBOSE=1``) keeps third-party
output (transformers / Hugging Face Hub progress bars and load reports, DeepSpeed and Ray info
lines), which is otherwise silenced once here for the command and the Ray workers it starts
(``bairlhf.progress.quiet_third_party``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

from bairlhf.errors import UserError
from bairlhf.progress import quiet_third_party

GLOBAL_FLAGS = {"--verbose": "keep third-party output (transformers/Hugging Face bars and load reports, "
                             "DeepSpeed and Ray info logs); also BAI_RLHF_VERBOSE=1"}
"""Flags that go before the command name."""


class UsageError(UserError):
    """A command-line argument that a command's parser rejected."""


def split_global_flags(argv: list[str]) -> tuple[dict[str, bool], list[str]]:
    """``(flags, rest)``: the global flags in front of the command name, and the rest of ``argv``."""
    flags = {"verbose": False}
    i = 0
    while i < len(argv) and argv[i] in GLOBAL_FLAGS:
        flags[argv[i].lstrip("-")] = True
        i += 1
    return flags, argv[i:]


def _usage_error(self: argparse.ArgumentParser, message: str):
    raise UsageError(f"{message} (see `{self.prog} --help`)")


@contextlib.contextmanager
def argparse_errors_as_user_errors():
    """Within the block, an ``argparse`` parser's ``error()`` raises ``UsageError`` (one line at
    the boundary) instead of printing the usage text and exiting."""
    saved = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _usage_error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = saved


def dispatch(prog: str, commands: dict, argv: list[str] | None = None) -> int:
    """``commands``: subcommand -> ("module:function taking argv", one-line help)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    flags, argv = split_global_flags(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} [--verbose] COMMAND [ARGS]\n\ncommands:")
        for name, (_, help_) in commands.items():
            print(f"  {name:<10} {help_}")
        print("\nglobal flags (before COMMAND):")
        for flag, help_ in GLOBAL_FLAGS.items():
            print(f"  {flag:<10} {help_}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"{prog}: unknown command {name!r}; run '{prog} --help'", file=sys.stderr)
        return 2
    with quiet_third_party(verbose=flags["verbose"]):  # before the command imports transformers / Ray
        return _run(prog, name, commands[name][0], rest)


def _run(prog: str, name: str, target: str, rest: list[str]) -> int:
    module, func = target.split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            print(f"{prog} {name}: not available in this version", file=sys.stderr)
            return 2
        raise
    try:
        with argparse_errors_as_user_errors():
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
