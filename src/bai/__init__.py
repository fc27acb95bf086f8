"""Balanced Actor Initialization: streaming checkpoint merges and ratio sweeps; imports no ``rlhf``.

The SFT-then-merge calibration (``bai calibrate``) builds on ``rlhf.sft`` and lives in ``rlhf.calibrate``.

Python API (imported lazily, so ``import bai`` stays cheap)::

    import bai
    dirs = bai.merge({"method": "bai", "base": ..., "sft_models": [...], "alpha": 0.5}, "out/", force=False)
"""

__version__ = "0.1.0"

_LAZY = {"merge": "bai.merge", "MergeConfig": "bai.config", "MergeError": "bai.config", "load_config": "bai.config"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'bai' has no attribute {name!r}")
    import importlib

    mod = importlib.import_module(_LAZY[name])
    return mod if name == "merge" else getattr(mod, name)   # bai.merge is a callable module
