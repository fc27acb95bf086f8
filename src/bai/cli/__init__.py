"""`bai` command line: merges, sweeps and calibration. One module per subcommand in this package
(``bai.cli.merge``); ``bai calibrate`` is dispatched by name to ``rlhf.cli.calibrate`` (it trains
with ``rlhf.sft``), so ``bai`` itself imports no ``rlhf``."""

from __future__ import annotations

import os
import sys

from bairlhf.cli import dispatch, split_global_flags

COMMANDS = {
    "merge": ("bai.cli.merge:main", "merge checkpoints from a YAML recipe (BAI two-stage, linear, TIES, DARE, SLERP...)"),
    "calibrate": ("rlhf.cli.calibrate:main", "SFT with an empty reasoning trace, then merge back at the calibrated ratio"),
}


def main(argv: list[str] | None = None) -> int:
    console_merge = argv is None and split_global_flags(sys.argv[1:])[1][:1] == ["merge"]
    if console_merge:  # the `bai merge` process itself, never a caller of main([...]) (tests, other code)
        _import_torch_quietly()
    rc = dispatch("bai", COMMANDS, argv)
    if console_merge:
        _exit_now(rc)
    return rc


def _import_torch_quietly() -> None:
    """Import ``bai.merge`` (torch: about 1 s of CPU, the largest part of a merge's start-up) with
    the cyclic GC off, then freeze what the import created, so later collections skip it (a tenth
    of the import, and most of the interpreter's teardown). Process-wide, hence only in the
    console-script process: frozen objects are never collected."""
    import gc

    was = gc.isenabled()
    gc.disable()
    try:
        import bai.merge  # noqa: F401
    finally:
        gc.freeze()
        if was:
            gc.enable()


def _exit_now(rc: int) -> None:
    """End a finished ``bai merge`` process without the interpreter's teardown of torch (0.1-0.2 s,
    several percent of a merge; 0.5 s without the ``gc.freeze`` of ``_import_torch_quietly``). Its files
    are closed and renamed by then; only the standard streams and logging handlers need a flush."""
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc)

