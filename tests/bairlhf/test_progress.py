"""bairlhf.progress: plain progress lines in non-TTY logs, third-party noise silenced unless
--verbose, and the dispatcher's global flag and one-line argparse errors (issue 12 point 8)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import types

import pytest

from bairlhf import cli, progress
from bairlhf.progress import LineProgress, quiet_third_party


class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clean_env(monkeypatch):
    for k in (*progress.QUIET_ENV, progress.VERBOSE_ENV):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_non_tty_progress_over_1000_updates_prints_at_most_25_plain_lines(capsys):
    bar = progress.progress(total=1000, desc="ppo", unit="step")  # stderr is captured: not a TTY
    assert isinstance(bar, LineProgress)
    for i in range(1000):
        bar.update(1)
        bar.set_postfix(reward=f"{i / 1000:.3f}")
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert 1 <= len(lines) <= 25
    assert lines[-1].startswith("ppo: 1000/1000 step (100%)") and "reward=0.999" in lines[-1]


def test_a_line_every_five_percent_when_updates_are_slow_enough(monkeypatch):
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)  # every update counts as "slow enough"
    out = io.StringIO()
    bar = progress.progress(range(1000), desc="sft", file=out)
    assert sum(1 for _ in bar) == 1000  # iterating closes it
    lines = out.getvalue().splitlines()
    assert len(lines) == 20  # 5%, 10%, ..., 95%, then the final line
    assert lines[0].startswith("sft: 50/1000 it (5%)") and "left" in lines[0]
    assert lines[-1].startswith("sft: 1000/1000 it (100%)")


def test_bytes_unknown_total_disabled_and_initial(monkeypatch):
    out = io.StringIO()
    with progress.progress(total=3 * 2 ** 20, unit="B", unit_scale=True, unit_divisor=1024, desc="bai merge",
                           file=out) as bar:
        bar.update(3 * 2 ** 20)
    assert out.getvalue().startswith("bai merge: 3.00MB/3.00MB (100%)")
    out = io.StringIO()
    bar = progress.progress(desc="read", file=out)  # unknown total: a line only every UNKNOWN_TOTAL_SECONDS
    monkeypatch.setattr(progress, "UNKNOWN_TOTAL_SECONDS", 0.0)
    bar.update(7)
    bar.close()
    assert len(out.getvalue().splitlines()) == 1 and out.getvalue().startswith("read: 7 it in ")
    out = io.StringIO()
    bar = progress.progress(total=10, disable=True, file=out)
    bar.update(10)
    bar.close()
    assert out.getvalue() == ""
    out = io.StringIO()
    bar = progress.progress(total=4, initial=4, desc="sweep", file=out)  # resumed, nothing left to do
    bar.close()
    assert out.getvalue() == ""


def test_write_prints_a_plain_line_in_a_log():
    out = io.StringIO()
    progress.progress.write("[rlhf train] note", file=out)
    assert out.getvalue() == "[rlhf train] note\n"


def test_on_a_terminal_it_is_a_tqdm_bar():
    from tqdm import tqdm

    bar = progress.progress(total=3, file=_Tty())
    assert isinstance(bar, tqdm)
    bar.close()


def test_quiet_sets_env_for_workers_filters_loggers_and_restores(clean_env):
    clean_env.setenv("TRANSFORMERS_VERBOSITY", "info")  # a value the user set is kept
    ds = logging.getLogger("DeepSpeed")
    with quiet_third_party(verbose=False):
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        assert os.environ["RAY_LOGGER_LEVEL"] == "warning"
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "info"
        assert progress.VERBOSE_ENV not in os.environ
        assert not ds.filter(logging.LogRecord("DeepSpeed", logging.WARNING, "f", 1, "banner", None, None))
        assert ds.filter(logging.LogRecord("DeepSpeed", logging.ERROR, "f", 1, "real error", None, None))
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ and os.environ["TRANSFORMERS_VERBOSITY"] == "info"
    assert ds.filter(logging.LogRecord("DeepSpeed", logging.WARNING, "f", 1, "banner", None, None))


def test_verbose_keeps_everything_and_is_exported(clean_env):
    with quiet_third_party(verbose=True):
        assert os.environ[progress.VERBOSE_ENV] == "1"
        assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    clean_env.setenv(progress.VERBOSE_ENV, "1")
    with quiet_third_party(verbose=False):
        assert "TRANSFORMERS_VERBOSITY" not in os.environ


def test_quiet_restores_an_already_imported_transformers(clean_env):
    from transformers.utils import logging as tf_logging

    before = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
    with quiet_third_party():
        assert tf_logging.get_verbosity() == logging.ERROR and not tf_logging.is_progress_bar_enabled()
    assert (tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()) == before


def _commands(monkeypatch, func):
    mod = types.ModuleType("fake_command_for_test")
    mod.main = func
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return {"cmd": (f"{mod.__name__}:main", "a test command")}


def test_dispatch_parses_the_global_verbose_flag(clean_env):
    seen = []
    commands = _commands(clean_env, lambda argv: seen.append((list(argv), os.environ.get(progress.VERBOSE_ENV),
                                                              os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"))))
    assert cli.dispatch("rlhf", commands, ["--verbose", "cmd", "--x", "1"]) == 0
    assert cli.dispatch("rlhf", commands, ["cmd"]) == 0
    assert seen == [(["--x", "1"], "1", None), ([], None, "1")]
    assert cli.split_global_flags(["--verbose", "train", "--verbose"]) == ({"verbose": True}, ["train", "--verbose"])


def test_dispatch_turns_an_argparse_error_into_one_line(clean_env, capsys):
    import argparse

    def main(argv):
        ap = argparse.ArgumentParser(prog="rlhf cmd")
        ap.add_argument("--steps", type=int)
        ap.parse_args(argv)

    assert cli.dispatch("rlhf", _commands(clean_env, main), ["cmd", "--steps", "many"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rlhf cmd: argument --steps: invalid int value: 'many' (see `rlhf cmd --help`)"]
    with pytest.raises(SystemExit):  # outside the dispatcher argparse behaves as usual
        main(["--steps", "many"])


def test_env_reaches_a_child_process_and_silences_transformers_loading(tiny_llama, clean_env):
    """A child process (as a Ray worker is) loading a model for another task: no "Loading weights"
    bar and no LOAD REPORT under the quiet env; both are there with --verbose."""
    code = ("import sys; from transformers import AutoModelForSequenceClassification as M; "
            "M.from_pretrained(sys.argv[1], num_labels=1)")

    def stderr_of():
        return subprocess.run([sys.executable, "-c", code, str(tiny_llama)], capture_output=True, text=True,
                              env=dict(os.environ), timeout=300).stderr

    with quiet_third_party(verbose=True):
        loud = stderr_of()
    with quiet_third_party():
        quiet = stderr_of()
    assert "LOAD REPORT" in loud and "Loading weights" in loud
    assert "LOAD REPORT" not in quiet and "Loading weights" not in quiet, quiet
