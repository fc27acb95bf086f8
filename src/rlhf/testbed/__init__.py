"""The CPU model organism of PPO instabilities (``rlhf testbed``); see docs/testbed.md."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from rlhf.testbed.build import main as build_main

    return build_main(argv)
