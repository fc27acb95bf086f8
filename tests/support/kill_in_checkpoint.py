"""Run `rlhf ARGS...` and SIGKILL this process in the middle of writing checkpoint STEP.

    python tests/support/kill_in_checkpoint.py STEP train CONFIG... key=value...

The kill lands after the actor, critic and engine states are in ``checkpoints/.tmp_step_STEP``
and before its trainer state is written and the directory renamed: a driver killed during a
checkpoint write, at a deterministic point (test-only; patches the trainer in this process).
"""

import os
import signal
import sys

import rlhf.trainer as trainer
from rlhf.cli import main

step, argv = int(sys.argv[1]), sys.argv[2:]
_write = trainer.atomic_write


def _killing_write(path, data):
    if path.name == "trainer_state.json" and path.parent.name == f".tmp_step_{step:06d}":
        os.kill(os.getpid(), signal.SIGKILL)
    return _write(path, data)


trainer.atomic_write = _killing_write
sys.exit(main(argv))
