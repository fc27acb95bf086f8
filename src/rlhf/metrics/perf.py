"""Model FLOPs utilisation of a PPO step (``perf/mfu*``), from the models' shapes, the batch's real
token counts and the phase timings. Pure: no torch, Ray or engines.

Counted per real (non-padding) token, with ``N`` a model's matmul parameters (attention
projections and MLP of every layer, plus the LM head for a policy or the 1-row score head for a
value / reward model; embedding lookups cost nothing) and ``A = 2 x layers x attention width x S``
the attention score and mixing products of one token at mean sequence length S (forward, full
square as usually counted):

- generate: ``2 N + A`` per prompt and response token of the policy (prefill and decode);
- score: ``2 N + A`` per token for each scoring model (actor unless its logprobs come from the
  rollout, reference, critic, reward model);
- train: ``3 (2 N + A)`` per token and epoch for the actor and for the critic (forward + backward).

``perf/mfu = FLOPs of the step / step time / peak``; ``perf/mfu_generate`` etc. per phase. The
peak is the whole job's: ``trainer.peak_tflops`` when set, else the GPUs' table peak
(``rlhf.engines.accelerator.peak_tflops``) times the GPUs in use, else (CPU) a matmul probe at
start in the training precision with the machine's cores. Tokens are real tokens, so padding
lowers the figure: it is the utilisation of useful work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class ModelShape:
    """What a model's FLOPs per token depend on."""

    matmul_params: float
    """Parameters in matrix multiplies per token (attention, MLP, and the output head)."""
    layers: int
    attn_width: int
    """Query heads x head dim."""

    def forward_flops(self, seq_len: float) -> float:
        """Forward FLOPs of one token at mean sequence length ``seq_len``."""
        return 2.0 * self.matmul_params + 2.0 * self.layers * self.attn_width * seq_len


def model_shape(config: Mapping, head: str) -> ModelShape:
    """The shape of a Hugging Face decoder config (``config.json`` as a mapping); ``head`` is
    ``lm`` (a policy: vocab-sized output head) or ``score`` (a 1-row value / reward head). Reads
    ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
    ``head_dim``, ``intermediate_size``, ``vocab_size`` (a missing one is a ``KeyError`` naming it)."""
    d, L = int(config["hidden_size"]), int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    hd = int(config.get("head_dim") or d // heads)
    kv = int(config.get("num_key_value_heads") or heads)
    inter = int(config["intermediate_size"])
    trunk = L * (2 * d * heads * hd + 2 * d * kv * hd + 3 * d * inter)
    out = d * int(config["vocab_size"]) if head == "lm" else d
    return ModelShape(matmul_params=float(trunk + out), layers=L, attn_width=heads * hd)


def step_flops(policy: ModelShape, critic: ModelShape | None, reward: ModelShape | None, prompt_tokens: float,
               response_tokens: float, rows: int, epochs: int, actor_scores: bool = True,
               actor_trains: bool = True) -> dict[str, float]:
    """FLOPs of one step's phases ``generate``, ``score``, ``train`` (module docstring). ``critic`` /
    ``reward`` None: none (critic-free estimator, rule-based reward); the reference has the policy's
    shape; ``actor_scores`` False when the old logprobs come from the rollout; ``actor_trains``
    False in critic warm-up steps."""
    tokens = float(prompt_tokens + response_tokens)
    seq = tokens / max(rows, 1)
    fwd_p = policy.forward_flops(seq) * tokens
    fwd_c = critic.forward_flops(seq) * tokens if critic is not None else 0.0
    fwd_r = reward.forward_flops(seq) * tokens if reward is not None else 0.0
    return {
        "generate": fwd_p,
        "score": fwd_p * (2 if actor_scores else 1) + fwd_c + fwd_r,
        "train": 3.0 * epochs * (fwd_p * (1 if actor_trains else 0) + fwd_c),
    }


def mfu_metrics(flops: Mapping[str, float], seconds: Mapping[str, float], peak_tflops: float | None
                ) -> dict[str, float]:
    """``perf/mfu`` (all phases over the step's time, ``seconds["step"]``) and ``perf/mfu_<phase>``
    for each phase of ``flops`` with a time; ``perf/model_tflops`` (achieved, whole step). No MFU
    keys without a peak."""
    step = max(float(seconds.get("step", 0.0)), 1e-9)
    out = {"perf/model_tflops": sum(flops.values()) / step / 1e12}
    if not peak_tflops:
        return out
    peak = float(peak_tflops) * 1e12
    out["perf/mfu"] = sum(flops.values()) / step / peak
    for k, f in flops.items():
        if k in seconds and seconds[k] > 0:
            out[f"perf/mfu_{k}"] = f / seconds[k] / peak
    return out
