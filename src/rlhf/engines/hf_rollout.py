"""Rollouts with transformers ``generate`` (the CPU default ``RolloutEngine``).

Prompts are left-padded into one batch; ``generate`` returns the processed scores (after
temperature, top-k and top-p), whose log-softmax at the sampled token is the sampling logprob
the trainer compares against. Sampling is seeded per call (``SamplingParams.seed``), so a run
and its resumed continuation draw the same tokens.
"""

from __future__ import annotations

from typing import Iterable

import torch

from rlhf.engines.base import Generation, SamplingParams


class HFRolloutEngine:
    """A frozen copy of the policy that samples with ``model.generate``."""

    def __init__(self, model_path: str, pad_token_id: int, eos_token_id: int, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM

        from rlhf.engines.accelerator import attn_implementation, model_device
        dev = model_device(torch.cuda.is_available())
        attn = attn_implementation(dtype == torch.bfloat16)  # the trainer's policy forwards use the same
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attn).to(dev)
        self.model.eval()
        self.pad_id, self.eos_id = pad_token_id, eos_token_id

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        if params.seed is not None:
            torch.manual_seed(params.seed)
        P = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), P), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(prompts), P), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, P - len(p):] = torch.tensor(p)
            attn[i, P - len(p):] = 1
        out = self.model.generate(
            input_ids=ids.to(self.model.device), attention_mask=attn.to(self.model.device), do_sample=True, max_new_tokens=params.max_new_tokens,
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None,
            eos_token_id=self.eos_id, pad_token_id=self.pad_id, output_scores=True,
            return_dict_in_generate=True)
        seq = out.sequences[:, P:]
        logps = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1)  # [B, T, V]
        taken = logps.gather(-1, seq[:, : logps.shape[1], None]).squeeze(-1).cpu()
        seq = seq.cpu()
        gens = []
        for i, p in enumerate(prompts):
            toks = seq[i].tolist()
            finished = self.eos_id in toks
            n = toks.index(self.eos_id) + 1 if finished else len(toks)
            gens.append(Generation(prompt_ids=list(p), response_ids=toks[:n], logprobs=taken[i, :n].tolist(),
                                   finished=finished))
        return gens

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        state = self.model.state_dict()
        for name, t in named_tensors:
            if name not in state:
                raise KeyError(f"update_weights: unknown parameter {name!r}")
            state[name].copy_(t.to(state[name].dtype))
