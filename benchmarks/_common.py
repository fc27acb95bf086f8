"""Shared command-line options of the PPO-step benchmarks (``driver_math.py``, ``metrics_cost.py``)."""

from __future__ import annotations

import argparse

import torch


def step_parser(doc: str, repeats: int) -> argparse.ArgumentParser:
    """A parser with the options of one PPO step's size: ``--batch`` responses (default 4096) of up
    to ``--max-len`` tokens (2000), ``--repeats`` timed runs (``repeats``) and ``--threads`` torch
    intra-op threads (2). The description is ``doc``'s first line."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4096, help="responses in the batch")
    ap.add_argument("--max-len", type=int, default=2000, help="longest response, tokens")
    ap.add_argument("--repeats", type=int, default=repeats, help="timed runs (the median is reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    return ap


def parse_step_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the command line and apply ``--threads`` (``torch.set_num_threads``)."""
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args
