"""Pure RL math: masked statistics, KL estimators, token rewards, GAE, the advantage-estimator
registry (GAE, GRPO, Dr. GRPO, RLOO, REINFORCE++), policy and value losses.

Imports torch only (no Ray, DeepSpeed, vLLM or Megatron; ``tests/test_layers.py`` enforces it).
All tensors are response-aligned ``[B, T]`` with ``mask`` 1.0 on response tokens.
"""

from rlhf.algo.advantages import adaptive_kl_coef, gae, gae_multi, gae_pair, last_token_index, token_rewards
from rlhf.algo.driver import DriverAdvantages, ppo_advantages
from rlhf.algo.estimators import (
    ESTIMATOR_NAMES, ESTIMATORS, LOSS_AGGS, AdvantageInputs, AdvantageResult, Estimator, compute_advantages,
    get_estimator, group_ids_for, loss_num_tokens,
)
from rlhf.algo.kl import KL_KINDS, entropy_from_logits, kl_from_log_ratio, kl_penalty, logprobs_from_logits
from rlhf.algo.losses import aggregate_token_loss, mismatch_keep_mask, policy_loss, truncated_is_weights, value_loss
from rlhf.algo.masked import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "DriverAdvantages", "ESTIMATORS", "ESTIMATOR_NAMES", "LOSS_AGGS", "AdvantageInputs", "AdvantageResult", "Estimator",
    "compute_advantages", "gae_multi", "gae_pair", "get_estimator", "group_ids_for", "loss_num_tokens",
    "KL_KINDS", "adaptive_kl_coef", "aggregate_token_loss", "entropy_from_logits", "gae", "kl_from_log_ratio",
    "kl_penalty", "last_token_index", "logprobs_from_logits", "masked_mean", "masked_sum", "masked_var",
    "masked_whiten", "mismatch_keep_mask", "policy_loss", "ppo_advantages", "token_rewards", "truncated_is_weights", "value_loss",
]
