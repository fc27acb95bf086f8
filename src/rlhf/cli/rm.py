"""`rlhf rm`: Bradley-Terry reward model training (library: ``rlhf.rm``)."""

from __future__ import annotations

import os
import sys

import rlhf.rm as _lib
from rlhf.rm import check_data, load_config, read_stats, train_reward_model


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_lib.__doc__)
        return 0
    force = "--force" in argv
    rest = [a for a in argv[1:] if a != "--force"]
    cfg = load_config(argv[0], rest + (["force=true"] if force else []))  # RMError: one line, exit 2
    check_data(cfg)  # every line of the pairs files, before loading anything
    out = train_reward_model(cfg)
    stats = read_stats(out)
    if int(os.environ.get("RANK", "0")) != 0:   # one line per job, not per rank
        return 0
    print(f"rlhf rm: wrote {out} (score mean {stats['mean']:.4f}, std {stats['std']:.4f}, "
          f"train pair accuracy {stats['train_pair_accuracy']:.3f}"
          + (f", eval {stats['eval_pair_accuracy']:.3f}" if stats['eval_pair_accuracy'] is not None else "") + ")")
    return 0
