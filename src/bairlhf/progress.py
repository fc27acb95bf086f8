"""Progress that stays readable in logs, and third-party noise kept out of them.

``progress(...)`` takes tqdm's arguments. On a terminal it *is* a tqdm bar. When its stream is
not a terminal (CI, SLURM, ``> file``) it prints plain lines instead of carriage-return
redraws: one line each time another ``LINE_PERCENT`` percent is done, but not more often than
every ``LINE_SECONDS`` seconds (whichever is rarer); with the total unknown, one line every
``UNKNOWN_TOTAL_SECONDS`` seconds; and one final line when it closes. A 1000-step loop therefore
writes at most ~21 lines to a log instead of thousands of redraws.

``with quiet_third_party(verbose):`` silences other libraries' progress bars and info logs
(transformers "Loading weights" bars and load reports, Hugging Face Hub bars, DeepSpeed info and
warnings, Ray's start-up lines). It sets environment variables, so Ray workers and subprocesses
started inside inherit it, and filters loggers in this process. ``bairlhf.cli.dispatch`` wraps
every command in it; ``--verbose`` (``rlhf --verbose train ...``) or ``BAI_RLHF_VERBOSE=1``
keeps everything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

LINE_PERCENT = 5.0
"""A non-TTY progress line is printed after at least this much more of the total is done."""
LINE_SECONDS = 10.0
"""... and at least this many seconds after the previous line."""
UNKNOWN_TOTAL_SECONDS = 30.0
"""With an unknown total, one line at most this often."""

VERBOSE_ENV = "BAI_RLHF_VERBOSE"
"""``1``: keep third-party output (the same as the global ``--verbose`` flag, which sets it)."""

QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",      # transformers: no info/warnings (load reports are warnings)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",    # huggingface_hub bars, and transformers' own ("Loading weights")
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "RAY_LOGGER_LEVEL": "warning",          # Ray's driver logger: no "Started a local Ray instance" lines
    "TORCH_CPP_LOG_LEVEL": "ERROR",         # c10 / gloo warnings from torch.distributed
}
"""Environment set (where not already set) by ``quiet_third_party``; inherited by Ray workers
and subprocesses started afterwards. DeepSpeed 0.19 reads no environment variable for its log
level: its ``DeepSpeed`` logger gets a filter instead (in this process)."""

QUIET_LOGGERS = ("DeepSpeed", "transformers", "huggingface_hub")
"""Loggers whose records below ERROR are dropped in this process when quiet (Ray keeps its
warnings: only its info lines go, through ``RAY_LOGGER_LEVEL``)."""


def is_verbose() -> bool:
    """Whether third-party output is kept (``BAI_RLHF_VERBOSE`` set to a true value)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


@contextlib.contextmanager
def quiet_third_party(verbose: bool = False):
    """Within the block, third-party progress bars and info logs are silenced unless ``verbose``
    (or ``BAI_RLHF_VERBOSE=1``).

    Verbose: exports ``BAI_RLHF_VERBOSE=1`` so workers and subprocesses keep their output too.
    Quiet: sets ``QUIET_ENV`` (values the user set are kept), adds a filter that drops records
    below ERROR to the ``QUIET_LOGGERS`` (it outlives DeepSpeed resetting its logger's level at
    import), and, if transformers is already imported (its environment already read), sets its
    verbosity to error and switches its bars off. On exit the environment, the filters and an
    already imported transformers' settings are restored (a transformers first imported inside
    the block keeps the quiet defaults it read from the environment).
    """
    saved_env = {k: os.environ.get(k) for k in (*QUIET_ENV, VERBOSE_ENV)}
    added: list[logging.Logger] = []
    tf_saved = None
    try:
        if verbose or is_verbose():
            os.environ[VERBOSE_ENV] = "1"
        else:
            for k, v in QUIET_ENV.items():
                os.environ.setdefault(k, v)
            for name in QUIET_LOGGERS:
                logger = logging.getLogger(name)
                if _below_error not in logger.filters:
                    logger.addFilter(_below_error)
                    added.append(logger)
            if "transformers.utils.logging" in sys.modules:
                from transformers.utils import logging as tf_logging

                tf_saved = (tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled())
                tf_logging.set_verbosity_error()
                tf_logging.disable_progress_bar()
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for logger in added:
            logger.removeFilter(_below_error)
        if tf_saved is not None:
            from transformers.utils import logging as tf_logging

            tf_logging.set_verbosity(tf_saved[0])
            if tf_saved[1]:
                tf_logging.enable_progress_bar()


def _size(n: float, scale: bool, divisor: int) -> str:
    if not scale:
        return f"{n:g}" if isinstance(n, float) else str(n)
    from tqdm import tqdm

    return tqdm.format_sizeof(n, divisor=divisor)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class LineProgress:
    """tqdm's interface (``update``, ``set_postfix``, ``set_description``, ``close``, iteration,
    ``with``), writing plain lines to a non-terminal stream; see the module docstring."""

    def __init__(self, iterable=None, desc: str | None = None, total: float | None = None, initial: float = 0,
                 unit: str = "it", unit_scale: bool = False, unit_divisor: int = 1000, disable: bool = False,
                 file=None, postfix=None, **_ignored):
        if total is None and iterable is not None:
            try:
                total = len(iterable)
            except (TypeError, AttributeError):
                total = None
        self.iterable, self.desc, self.total, self.n = iterable, desc or "", total, initial
        self.unit, self.unit_scale, self.unit_divisor = unit, unit_scale, unit_divisor
        self.disable, self.file = disable, file
        self.postfix = "" if postfix is None else (", ".join(f"{k}={v}" for k, v in postfix.items())
                                                   if isinstance(postfix, dict) else str(postfix))
        self.start = self.last_t = time.monotonic()
        self.last_n, self.initial, self.lines, self.closed = initial, initial, 0, False

    def __iter__(self):
        for x in self.iterable:
            yield x
            self.update(1)
        self.close()

    def __len__(self):
        return int(self.total or 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n: float = 1) -> None:
        """Advance by ``n``; print a line when another ``LINE_PERCENT`` is done and ``LINE_SECONDS``
        passed (unknown total: ``UNKNOWN_TOTAL_SECONDS``)."""
        if self.disable or self.closed:
            return
        self.n += n
        now = time.monotonic()
        if self.total:
            due = (self.n - self.last_n) * 100.0 / self.total >= LINE_PERCENT and now - self.last_t >= LINE_SECONDS
        else:
            due = now - self.last_t >= UNKNOWN_TOTAL_SECONDS
        if due and not (self.total and self.n >= self.total):  # the final line comes from close()
            self._line(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        """Shown at the end of the next line, as ``key=value`` pairs."""
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        """Print the final line (when anything happened since the last one)."""
        if self.disable or self.closed:
            return
        self.closed = True
        if self.n != self.last_n:
            self._line(time.monotonic())

    def format_line(self, now: float | None = None) -> str:
        """``desc: n/total unit (pct%) elapsed [ETA], rate, postfix``."""
        now = time.monotonic() if now is None else now
        el = now - self.start
        scaled = self.unit_scale

        def amount(x: float) -> str:  # "3.00MB" (scaled) or "50"
            return _size(x, scaled, self.unit_divisor) + (self.unit if scaled else "")

        unit = "" if scaled else f" {self.unit}"
        if self.total:
            pct = 100.0 * self.n / self.total
            done = self.n - self.initial
            left = (f", ~{_clock(el * (self.total - self.n) / done)} left" if 0 < done and self.n < self.total else "")
            parts = [f"{amount(self.n)}/{amount(self.total)}{unit} ({pct:.0f}%) in {_clock(el)}{left}"]
        else:
            parts = [f"{amount(self.n)}{unit} in {_clock(el)}"]
        if el > 0 and self.n > self.initial:
            rate = (self.n - self.initial) / el
            parts.append(f"{amount(rate)}/s" if scaled else f"{rate:.3g} {self.unit}/s")
        if self.postfix:
            parts.append(self.postfix)
        return (f"{self.desc}: " if self.desc else "") + ", ".join(parts)

    def _line(self, now: float) -> None:
        print(self.format_line(now), file=self.file or sys.stderr, flush=True)
        self.last_n, self.last_t, self.lines = self.n, now, self.lines + 1


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress(iterable=None, desc: str | None = None, total: float | None = None, **kwargs):
    """A progress bar with tqdm's arguments: a tqdm bar on a terminal, ``LineProgress`` (plain
    lines every few percent) when the stream (``file``, default stderr) is not a terminal."""
    if _is_tty(kwargs.get("file") or sys.stderr):
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, **kwargs)
    return LineProgress(iterable, desc=desc, total=total, **kwargs)


def write(s: str, file=None, end: str = "\n") -> None:
    """Print a line without breaking a progress bar (``tqdm.write`` on a terminal, ``print`` in a
    log); also ``progress.write``, for code that calls ``tqdm.write`` on the alias."""
    stream = file or sys.stderr
    if _is_tty(stream):
        from tqdm import tqdm

        tqdm.write(s, file=stream, end=end)
    else:
        print(s, file=stream, end=end, flush=True)


progress.write = write
