"""Balanced Actor Initialization: streaming checkpoint merges, ratio sweeps, SFT-then-merge calibration."""

__version__ = "0.1.0"
