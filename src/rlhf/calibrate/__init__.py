"""SFT-then-merge calibration (seed 000): ``bai calibrate CONFIG.yaml --out DIR``.

Adapt a reasoning model M with input-output data only: SFT with an empty reasoning trace
gives M_sft; merging back, M_a = (1 - a) M + a M_sft, recovers reasoning. ``a`` is the weight
of the **SFT model** (the paper's alpha), called ``sft_weight`` in code and config; the search
returns alpha* = the largest a whose calibration reasoning rate stays >= rho_min.

Layering: ``rlhf.calibrate`` trains with ``rlhf.sft`` and merges with ``bai``, so it lives in
``rlhf``; ``bai`` imports no ``rlhf`` at all (its ``bai calibrate`` command names this module as a
string and imports it only when run; enforced by ``tests/test_layers.py``).

Modules: ``config`` (typed config, Table 2 presets, appendix-B prompts), ``data`` (empty-trace
serialization, decision path), ``estimators`` (short-prefix and logit reasoning rates),
``search`` (grid and binary search, probe table, plot), ``merging`` (adapter scaling, full
merges), ``pipeline`` (the command).
"""

from .config import TABLE2_PRESETS, CalibrateConfig, CalibrateError, load_config
from .pipeline import run

__all__ = ["CalibrateConfig", "CalibrateError", "TABLE2_PRESETS", "load_config", "run"]
