"""Distributed PPO for RLHF stability research (Ray, DeepSpeed, transformers / vLLM rollouts)."""

__version__ = "0.1.0"
