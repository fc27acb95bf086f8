"""The organism's rewards and gold metrics for ``rlhf train`` (``module:function`` names).

All follow the rule-based reward contract of ``rlhf.rewards``: ``fn(prompts, responses, finished)``
on decoded texts (responses decoded without EOS/padding; the reasoning markers are kept because
the testbed tokenizer does not mark them special).

- ``rlhf.testbed.rewards:exact``: 1 for a finished response whose final answer is a + b, else 0.
- ``rlhf.testbed.rewards:rm_plus_exact``: the reward model's score, normalized with the mean/std it
  recorded at training, plus ``exact_weight`` (1.0) times the exact reward. The reward model is
  read from ``$RLHF_TESTBED_RM`` (default ``runs/testbed/models/rm``) on first use.
- ``rlhf.testbed.rewards:gold`` (for ``reward.metrics``): ``gold/accuracy`` and
  ``rollout/think_rate`` of the batch, logged every step beside the reward.

The reward-model-only condition uses the trainer's own ``reward.model`` (raw scores, as PPO
would use any reward model).
"""

from __future__ import annotations

import os
from functools import lru_cache

from rlhf.testbed import task

RM_ENV = "RLHF_TESTBED_RM"
DEFAULT_RM = "runs/testbed/models/rm"


def exact(prompts: list[str], responses: list[str], finished: list[bool]) -> list[float]:
    """Exact-correctness reward: 1.0 when the response ended with EOS and its answer is a + b."""
    return [task.exact_correctness(p, r) if f else 0.0 for p, r, f in zip(prompts, responses, finished)]


def gold(prompts: list[str], responses: list[str], finished: list[bool]) -> dict[str, float]:
    """``gold/accuracy`` (exact answer, finished responses) and ``rollout/think_rate`` (non-empty traces)."""
    m = task.gold_metrics(prompts, [r if f else "" for r, f in zip(responses, finished)])
    m["rollout/think_rate"] = task.gold_metrics(prompts, responses)["rollout/think_rate"]
    return m


@lru_cache(maxsize=2)
def _reward_model(path: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.rm import read_stats

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{RM_ENV}: reward model directory not found: {path} (run `rlhf testbed build`)")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    return AutoTokenizer.from_pretrained(path), model, read_stats(path)


def rm_scores(prompts: list[str], responses: list[str], finished: list[bool], path: str | None = None) -> list[float]:
    """Normalized reward-model scores of prompt + response (+ EOS when finished)."""
    import torch

    tok, model, stats = _reward_model(os.path.abspath(path or os.environ.get(RM_ENV, DEFAULT_RM)))
    seqs = [tok.encode(p + r, add_special_tokens=False) + ([tok.eos_token_id] if f else [])
            for p, r, f in zip(prompts, responses, finished)]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        raw = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    return ((raw - stats["mean"]) / max(stats["std"], 1e-6)).tolist()


def rm_plus_exact(prompts: list[str], responses: list[str], finished: list[bool],
                  exact_weight: float = 1.0) -> list[float]:
    """Both signals: normalized reward-model score + ``exact_weight`` x exact correctness."""
    return [s + exact_weight * e for s, e in zip(rm_scores(prompts, responses, finished),
                                                exact(prompts, responses, finished))]
