"""`rlhf train`: PPO from a YAML config (the loop: ``rlhf.trainer``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlhf.config import ConfigError, load_config
from rlhf.trainer import COMMAND, RESUMABLE_KEYS, RunStopped, latest_checkpoint, train


def main(argv: list[str] | None = None) -> int:
    """`rlhf train [CONFIG.yaml] [key.sub=value ...] [--resume RUN_DIR] [--force]`.

    Bad input raises ``ConfigError`` (the ``rlhf`` error boundary prints one line, exit 2) before
    anything is written; a run that stops on purpose exits 1; the last line says what was written."""
    ap = argparse.ArgumentParser(prog=COMMAND, description="Run PPO from a YAML config.")
    ap.add_argument("args", nargs="*", help="CONFIG.yaml (default: configs/ppo/tiny_cpu.yaml) then key.sub=value overrides")
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint "
                    f"(only {', '.join(k for k in RESUMABLE_KEYS if k != 'run_dir')} may be overridden)")
    ap.add_argument("--force", action="store_true", help="replace run_dir when an earlier `rlhf train` created it")
    ns = ap.parse_args(argv)
    args = list(ns.args)
    config = args.pop(0) if args and "=" not in args[0] else None
    if ns.resume:
        if config is not None or ns.force:
            raise ConfigError("--resume: give either CONFIG [--force] or --resume RUN_DIR (the run's config.yaml is used)")
        cfg_path = Path(ns.resume) / "config.yaml"
        if not cfg_path.exists():
            raise ConfigError(f"--resume: {cfg_path} does not exist")
        cfg = load_config(cfg_path, args + [f"run_dir={ns.resume}"])
    else:
        cfg = load_config(config, args)
    try:
        run_dir = train(cfg, resume=bool(ns.resume), force=ns.force, overrides=args)
    except RunStopped as e:
        print(f"{COMMAND}: {e}", file=sys.stderr)
        return 1
    ckpt = latest_checkpoint(run_dir)
    print(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    print(f"{COMMAND}: wrote {run_dir} ({cfg.trainer.total_steps} steps: metrics.jsonl, tensorboard/, "
          f"checkpoints/{ckpt.name if ckpt else '-'}, config.yaml)")
    return 0
