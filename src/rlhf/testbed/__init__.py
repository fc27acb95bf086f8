"""The CPU model organism of PPO instabilities (``rlhf testbed``); see docs/testbed.md.

``rlhf testbed build [...]`` synthesizes the addition task's data and trains the organism's
models with ``rlhf sft`` and ``rlhf rm`` (``rlhf.testbed.build``; the command line is ``rlhf.cli.testbed``); PPO runs on them with
``rlhf train configs/testbed/*.yaml``.
"""
