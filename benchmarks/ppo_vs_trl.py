"""Time per PPO step: `rlhf train` (Ray + DeepSpeed, CPU) against TRL 1.12.0's PPOTrainer, one run.

Both sides get the same models, built on the spot (nothing downloaded): a Llama policy (hidden
512, 8 layers, 8 heads of 64, intermediate 2048, ~34M parameters), a sequence-classification
reward model of the same shape, and a value model initialised from the reward model (the
paper's critic init, and TRL's usual setup). The reference is a second copy of the policy.

The work per PPO step is matched:

- 8 prompts (the built-in arithmetic prompts, same chat template and left padding), exactly
  32 sampled tokens each. To force 32 tokens on both sides without touching either sampler,
  the tokenizer's EOS is a token the models cannot emit: a special token appended after the
  384-token model vocabulary (id 384), written as ``eos_token_id`` in the tokenizer, config and
  generation config. ``generate`` then never stops early on either side (ours runs
  transformers ``generate`` too), and both report 0 EOS tokens.
- Scoring: one batch of 8 through the reference, the value model and the reward model on both
  sides (TRL ``local_rollout_forward_batch_size=8``). Both take the PPO old logprobs from the
  sampler (TRL from the sampler's scores; ours with ``ppo.old_logp_source=rollout``, which keeps
  the policy's scoring forward at step 0 only, for the rollout-vs-trainer check; that step is the
  warm-up and is not pooled).
- 4 PPO epochs x 1 mini-batch of 8 x 1 micro-batch of 8: 4 forward/backward passes and 4
  AdamW steps for the policy and 4 for the value model per PPO step (TRL:
  ``per_device_train_batch_size=8, gradient_accumulation_steps=1, num_mini_batches=1``, and
  ``gradient_checkpointing=False``: TRL's own default is True, which recomputes every forward in
  the backward pass, and ours does not checkpoint; ours:
  ``ppo.mini_batch_size=8, ppo.micro_batch_size=8``; TRL sums the two losses into one backward,
  ours trains the two models in two workers at once). CPU only, no eval, no sample generations,
  no checkpoints inside the timed steps. Ours clips gradient norms (its default; one norm over the
  gradients per optimizer step), TRL's loop does not.
- Precision (``--precision``, default both, bf16 first): **bf16** is each side's own bf16 mixed
  precision, the mode real PPO runs use. TRL: ``bf16=True`` (accelerate autocasts the policy and
  value forwards, fp32 weights and AdamW); its reference and reward model, which TRL does not
  autocast, are loaded in bf16 so the peer runs at its best. Ours: ``deepspeed.bf16=true``
  (DeepSpeed keeps bf16 weights with fp32 master weights and AdamW states; reference, reward model
  and rollout engine hold bf16 weights; logprobs, values and losses in fp32). **fp32**: float32
  everywhere on both sides. bf16 matrix multiplies run about 4.6x faster than fp32 on this CPU
  (AVX512-BF16/AMX), so precision changes both sides' times; each precision has its own ratio.

Ours runs the real loop (``rlhf.trainer.train``: Ray workers with 1 torch thread each, DeepSpeed
ZeRO-0 with gloo, the ``configs/ppo/tiny_cpu.yaml`` defaults plus the overrides printed below);
its step time is the logged ``timing/step`` of each ``metrics.jsonl`` record. TRL runs in this
process, once per ``--trl-threads`` torch thread count (default 1 and 2, the machine's cores);
the faster one is the peer. Its step time is the time between ``on_step_end`` callbacks, and its
``batch_generation`` is wrapped to time generation. The machine is shared, so its load drifts:
the sides alternate for ``--rounds`` rounds of ``--steps`` steps each, the first step of every
run is a warm-up, and the medians pool the remaining steps. Prints per-step times, the stage
breakdowns, per-round ratios and, per precision, the pooled ratio ours / TRL; then the headline
ratio (target <= 0.7): ours at its fastest precision against TRL at its fastest configuration
over every precision and thread count run (the peer gets the best of all it was given).

    python benchmarks/ppo_vs_trl.py            # --steps 3 --rounds 2 --trl-threads 1,2 --precision bf16,fp32

``--model real`` runs the same comparison on the project's real pretrained model
(``scripts/real_model.py``: SmolLM2-135M-Instruct, 30 layers, bf16 safetensors) instead: it is the
policy and the reference, and the reward model is the same trunk with a seeded 1-row score head
(the value model starts from it, as above), 48 new tokens (``--response``), target <= 0.5. Its
tokenizer gets the never-emitted EOS (id 49152, after the 49152-row embedding) and a pad token an
instruct model does not emit (``<gh_stars>``; TRL finds response lengths at the first pad, so TRL's
responses are checked for it). Ours runs with ``trainer.rollout_check_tol=1`` (override with
``--rollout-check-tol``) so a bf16 step-0 rollout-vs-trainer mismatch above the default 1e-3 does
not stop the benchmark; the measured step-0 value is printed. Every run also prints ours' train
phase MFU and both sides' whole-step MFU (ours' counted model FLOPs of the step, the same work on
both sides) against this CPU's 2-thread matmul peak, probed at start (``probe_peaks``), and the
load average at the start and end of each side's run.

    python benchmarks/ppo_vs_trl.py --model real --trl-threads 2 --precision bf16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BATCH, RESPONSE, EPOCHS, KL_COEF, LR = 8, 32, 4, 0.05, 1e-6
REAL_RESPONSE = 48  # --model real
NEVER_EOS = "<|never|>"


def load_average() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def never_stop(tok, vocab: int, dirs: list[Path], pad: str | None = None) -> None:
    """Give ``tok`` an EOS the models cannot emit (a special token appended after the ``vocab``-row
    embedding) and, when ``pad`` is given, that pad token; save it into ``dirs`` and write the same
    ids into their config and generation config, so ``generate`` never stops early on either side."""
    tok.add_special_tokens({"eos_token": NEVER_EOS, **({"pad_token": pad} if pad else {})})
    assert tok.eos_token_id == vocab, (tok.eos_token_id, vocab)  # outside the model vocabulary: never sampled
    for d in dirs:
        tok.save_pretrained(str(d))
        for name in ("config.json", "generation_config.json"):
            f = d / name
            if f.exists():
                cfg = json.loads(f.read_text())
                cfg.update(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
                f.write_text(json.dumps(cfg, indent=2))


def build_models(root: Path, hidden: int, layers: int, heads: int, response: int) -> dict[str, Path]:
    """Policy and reward model directories sharing one tokenizer whose EOS the models cannot emit."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from rlhf import tiny

    tok = tiny.train_tokenizer()
    shape = dict(hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=4 * hidden)
    policy = tiny.make_tiny_model(root / "policy", tokenizer=tok, seed=0, max_shard_size="2GB", **shape)
    lm = tiny.make_tiny_model(root / "rm_lm", tokenizer=tok, seed=1, max_shard_size="2GB", **shape)
    torch.manual_seed(2)  # the score head
    rm = AutoModelForSequenceClassification.from_pretrained(str(lm), num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(str(root / "rm"))
    vocab = rm.config.vocab_size
    never_stop(tok, vocab, [policy, root / "rm"])
    n = sum(p.numel() for p in rm.parameters())
    print(f"models: Llama hidden {hidden}, {layers} layers, {heads} heads, {n / 1e6:.1f}M parameters each "
          f"(policy, reference, reward, value); EOS id {tok.eos_token_id} >= vocab {vocab}: "
          f"always {response} new tokens")
    return {"policy": policy, "rm": root / "rm"}


# a special token of the real model's tokenizer that an instruct model answering arithmetic does
# not emit: the pad (TRL finds response lengths at the first pad); TRL's responses are checked for it
REAL_PAD = "<gh_stars>"


def build_real_models(root: Path, response: int) -> dict[str, Path]:
    """The real model (``scripts/real_model.py``: SmolLM2-135M-Instruct, bf16) as the policy (its
    weights linked, not copied) and a reward model of the same trunk with a seeded score head."""
    import subprocess
    import sys

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    script = Path(__file__).resolve().parents[1] / "scripts" / "real_model.py"
    src = Path(subprocess.run([sys.executable, str(script)], check=True, capture_output=True,
                              text=True).stdout.strip().splitlines()[-1])
    policy = root / "policy"
    policy.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (policy / f.name).symlink_to(f)
        elif f.is_file():
            (policy / f.name).write_bytes(f.read_bytes())
    torch.manual_seed(2)  # the score head
    rm = AutoModelForSequenceClassification.from_pretrained(str(src), num_labels=1, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(str(src))
    vocab = rm.config.vocab_size
    assert len(tok) == vocab, (len(tok), vocab)
    rm.save_pretrained(str(root / "rm"))
    never_stop(tok, vocab, [policy, root / "rm"], pad=REAL_PAD)
    n = sum(p.numel() for p in rm.parameters())
    print(f"models: {src} (Llama, {rm.config.num_hidden_layers} layers, hidden {rm.config.hidden_size}, "
          f"bf16 on disk) as policy, reference and reward/value trunk ({n / 1e6:.1f}M parameters with the "
          f"score head); EOS id {tok.eos_token_id} >= vocab {vocab}, pad {REAL_PAD!r} "
          f"(id {tok.pad_token_id}): always {response} new tokens")
    return {"policy": policy, "rm": root / "rm"}


def probe_peaks(threads: int = 2) -> dict[str, float]:
    """This machine's bf16 / fp32 matmul peak (GFLOP/s) with ``threads`` torch threads, measured at
    start by the trainer's own probe (``rlhf.engines.accelerator.matmul_peak_tflops``): the MFU
    denominator of both sides."""
    import torch

    from rlhf.engines.accelerator import matmul_peak_tflops

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return {"bf16": matmul_peak_tflops("bfloat16") * 1e3, "fp32": matmul_peak_tflops("float32") * 1e3}
    finally:
        torch.set_num_threads(before)


def train_flops(model_dir: Path, tokens: float, seq_len: float, epochs: int) -> float:
    """Model FLOPs of the train phase: actor and critic each run ``epochs`` forward+backward passes
    over ``tokens`` tokens of mean sequence length ``seq_len``, at 6 x (matmul parameters) + 12 x
    layers x heads x head_dim x seq_len FLOPs per token (the attention scores and mixing, full
    square as usually counted). The actor's matmul parameters include the (tied) LM head; the
    critic's replace it with a 1-row score head; embedding lookups cost nothing."""
    c = json.loads((model_dir / "config.json").read_text())
    d, L, inter, heads = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["num_attention_heads"]
    hd = c.get("head_dim") or d // heads
    kv = c.get("num_key_value_heads") or heads
    trunk = L * (d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * inter)
    attn = 12 * L * heads * hd * seq_len
    actor, critic = trunk + d * c["vocab_size"], trunk + d
    return epochs * tokens * (6 * actor + attn + 6 * critic + attn)


def ours(models: dict[str, Path], root: Path, steps: int, bf16: bool = False, response: int = RESPONSE,
         extra: tuple[str, ...] = ()) -> dict:
    """`rlhf train` on the benchmark models; per-step timings from its metrics.jsonl."""
    import ray

    from rlhf.config import load_config
    from rlhf.trainer import train

    run_dir = root / "ours"
    overrides = [
        f"run_dir={run_dir}", f"model.actor={models['policy']}", f"reward.model={models['rm']}",
        "reward.function=null", f"ppo.rollout_batch_size={BATCH}", f"ppo.mini_batch_size={BATCH}",
        f"ppo.micro_batch_size={BATCH}", f"ppo.ppo_epochs={EPOCHS}", f"rollout.max_new_tokens={response}",
        f"ppo.kl_coef={KL_COEF}", f"optim.actor_lr={LR}", f"optim.critic_lr={LR}", "optim.warmup_steps=0",
        f"trainer.total_steps={steps}", "trainer.save_every=0", "trainer.probe_every=0",
        "ppo.old_logp_source=rollout", f"deepspeed.bf16={str(bf16).lower()}", *extra]
    tmp = str(Path(models["policy"]).parents[1])
    print("ours: rlhf train configs/ppo/tiny_cpu.yaml " + " ".join(o.replace(tmp, "$TMP") for o in overrides))
    cfg = load_config(None, overrides)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)  # our own cluster, never a peer's
    try:
        train(cfg)
    finally:
        ray.shutdown()
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lengths = {r["rollout/length_mean"] for r in recs}
    assert lengths == {float(response)}, f"ours sampled response lengths {lengths}, expected {response}"
    keys = ["timing/generate", "timing/score", "timing/train", "timing/sync"]
    return {"steps": [r["timing/step"] for r in recs],
            "stages": {k.split("/")[1]: [r[k] for r in recs] for k in keys},
            "tokens": [r["perf/tokens_per_s"] * r["timing/step"] for r in recs],
            "step_tflop": [r["perf/model_tflops"] * r["timing/step"] for r in recs if "perf/model_tflops" in r],
            "rollout_vs_trainer": recs[0].get("kl/rollout_vs_trainer")}


def trl(models: dict[str, Path], root: Path, steps: int, threads: int, bf16: bool = False,
        response: int = RESPONSE, check_pad: bool = False) -> dict:
    """TRL 1.12.0 PPOTrainer configured for the same work; per-step wall times from a callback."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    from rlhf.data import builtin_arith, encode_prompts

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(models["policy"]), padding_side="left")
    tok.padding_side = "left"  # TRL generates after the query: prompts must be left-padded
    ds = Dataset.from_dict({"input_ids": encode_prompts(builtin_arith(256), tok, max_tokens=64)})
    stamps: list[float] = []
    gen_times: list[float] = []
    logged: list[dict] = []
    batch_generation = trl_ppo.batch_generation

    def timed_generation(*a, **kw):
        t = time.perf_counter()
        out = batch_generation(*a, **kw)
        gen_times.append(time.perf_counter() - t)
        assert out[0].shape[1] - a[1].shape[1] == response, f"TRL did not sample exactly {response} tokens"
        if check_pad:  # TRL cuts a response at its first pad token: none may be sampled
            assert not (out[0][:, a[1].shape[1]:] == tok.pad_token_id).any(), "TRL sampled the pad token"
        return out

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())
            print(f"  TRL step {len(stamps)}: {stamps[-1] - (stamps[-2] if len(stamps) > 1 else start):.2f} s, "
                  f"{load_average()}", flush=True)

        def on_log(self, args, state, control, logs=None, **kw):
            logged.append(dict(logs or {}))

    args = PPOConfig(
        output_dir=str(root / "trl"), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        num_mini_batches=1, num_ppo_epochs=EPOCHS, response_length=response, total_episodes=BATCH * steps,
        local_rollout_forward_batch_size=BATCH, learning_rate=LR, kl_coef=KL_COEF, stop_token="eos",
        num_sample_generations=0, save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
        bf16=bf16, fp16=False, seed=0, logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        gradient_checkpointing=False)  # TRL's default True re-runs every forward in backward; ours does not
    policy = AutoModelForCausalLM.from_pretrained(str(models["policy"]), dtype=torch.float32)
    # TRL's bf16 mode autocasts the policy and value model it trains (fp32 weights) but runs the
    # reference and reward model as loaded, so in bf16 mode they are loaded in bf16 (TRL at its best)
    frozen = torch.bfloat16 if bf16 else torch.float32
    ref = AutoModelForCausalLM.from_pretrained(str(models["policy"]), dtype=frozen)
    rm = AutoModelForSequenceClassification.from_pretrained(str(models["rm"]), num_labels=1, dtype=frozen)
    value = AutoModelForSequenceClassification.from_pretrained(str(models["rm"]), num_labels=1, dtype=torch.float32)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                         value_model=value, train_dataset=ds, callbacks=[Clock()])
    trl_ppo.batch_generation = timed_generation
    try:
        start = time.perf_counter()
        trainer.train()
    finally:
        trl_ppo.batch_generation = batch_generation
        torch.set_num_threads(before)
    eos = [x["val/num_eos_tokens"] for x in logged if "val/num_eos_tokens" in x]
    assert eos and not any(eos), f"TRL sampled EOS tokens: {eos}"
    del trainer, policy, ref, rm, value
    gc.collect()
    times = [b - a for a, b in zip([start] + stamps, stamps)]
    return {"steps": times, "stages": {"generate": gen_times}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="PPO steps per run; the first is a warm-up")
    ap.add_argument("--model", choices=["tiny", "real"], default="tiny",
                    help="tiny: random Llama built on the spot (--hidden/--layers/--heads); real: the "
                         "project's real model fixture (scripts/real_model.py, SmolLM2-135M-Instruct)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--response", type=int, default=None,
                    help=f"new tokens per response (default {RESPONSE} tiny, {REAL_RESPONSE} real)")
    ap.add_argument("--rollout-check-tol", type=float, default=None,
                    help="ours: trainer.rollout_check_tol (default: the config's; real: 1, the step-0 "
                         "rollout-vs-trainer value is printed instead of stopping the run)")
    ap.add_argument("--trl-threads", type=lambda x: [int(v) for v in x.split(",")], default=[1, 2],
                    help="torch thread counts to run TRL with (comma-separated); the fastest is the peer")
    ap.add_argument("--rounds", type=int, default=2,
                    help="alternate TRL and ours this many times (the shared machine's load drifts)")
    ap.add_argument("--precision", type=lambda x: x.split(","), default=["bf16", "fp32"],
                    help="comma-separated: bf16 (both sides' bf16 mixed precision) and/or fp32")
    a = ap.parse_args()
    if a.steps < 2:
        ap.error("--steps: need at least 2 (the first step of each run is a warm-up)")
    if not a.precision or set(a.precision) - {"bf16", "fp32"}:
        ap.error(f"--precision: expected bf16 and/or fp32, got {a.precision}")
    real = a.model == "real"
    a.response = a.response or (REAL_RESPONSE if real else RESPONSE)
    a.target = 0.5 if real else 0.7
    tol = a.rollout_check_tol if a.rollout_check_tol is not None else (1.0 if real else None)
    a.extra = (f"trainer.rollout_check_tol={tol}",) if tol is not None else ()
    with tempfile.TemporaryDirectory(prefix="ppo_vs_trl_") as d:
        root = Path(d)
        a.peaks = probe_peaks()
        print(f"matmul probe (2 threads, 1024-square): bf16 {a.peaks['bf16']:.1f} GFLOP/s, fp32 "
              f"{a.peaks['fp32']:.1f} GFLOP/s (the MFU denominator)", flush=True)
        models = (build_real_models(root / "models", a.response) if real
                  else build_models(root / "models", a.hidden, a.layers, a.heads, a.response))
        med: dict[str, float] = {}
        for precision in a.precision:
            med.update(compare(models, root / precision, a, precision == "bf16"))
    ours_best = min((k for k in med if k.startswith("rlhf")), key=med.get)
    trl_best = min((k for k in med if k.startswith("TRL")), key=med.get)
    print("summary (median s/step): " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))
    print(f"ratio ours at its best ({ours_best}: {med[ours_best]:.2f} s) / TRL at its best ({trl_best}: "
          f"{med[trl_best]:.2f} s) = {med[ours_best] / med[trl_best]:.2f} (target <= {a.target})")


def compare(models: dict[str, Path], root: Path, a, bf16: bool) -> dict[str, float]:
    """One precision: alternate the sides for ``a.rounds`` rounds, print times and the ratio;
    returns each side's median step time, keyed ``"<side>, <precision>"``."""
    precision = "bf16 mixed precision" if bf16 else "float32"
    sides = [f"TRL 1.12.0 PPOTrainer, {k} thread(s)" for k in a.trl_threads] + ["rlhf train (Ray + DeepSpeed)"]
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for rnd in range(a.rounds):
        for name, k in zip(sides, a.trl_threads + [None]):
            load0 = load_average()
            print(f"[{precision}] round {rnd + 1}/{a.rounds}, {name}: start, {load0}", flush=True)
            work = root / f"round{rnd}_{k or 'ours'}"
            run = (trl(models, work, a.steps, k, bf16, a.response, check_pad=a.model == "real") if k
                   else ours(models, work, a.steps, bf16, a.response, a.extra))
            run["load"] = f"{load0} -> {load_average()}"
            runs[name].append(run)
            print(f"[{precision}] round {rnd + 1}/{a.rounds}, {name}: done, {load_average()}", flush=True)
    pooled = lambda name, key=None: [x for r in runs[name]  # noqa: E731  (each run's first step is a warm-up)
                                     for x in (r["stages"][key] if key else r["steps"])[1:]]
    fmt = lambda xs: " ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    med = {name: statistics.median(pooled(name)) for name in sides}
    print(f"\n== {precision}: batch {BATCH}, {a.response} new tokens, {EPOCHS} PPO epochs x 1 mini-batch x 1 "
          f"micro-batch, CPU; {a.rounds} round(s) x {a.steps} steps per side, the first step of each run is a warm-up")
    for name in sides:
        print(f"{name}")
        for rnd, r in enumerate(runs[name]):
            print(f"  round {rnd + 1} steps (s): {fmt(r['steps'])}   ({r['load']})")
        stages = ", ".join(f"{k} {statistics.median(pooled(name, k)):.2f} s" for k in runs[name][0]["stages"])
        print(f"  median of {len(pooled(name))}: {med[name]:.2f} s/step ({stages})")
    ours_name, trl_names = sides[-1], sides[:-1]
    best = min(trl_names, key=med.get)
    per_round = [statistics.median(o["steps"][1:]) / statistics.median(t["steps"][1:])
                 for o, t in zip(runs[ours_name], runs[best])]
    tokens = statistics.median([x for r in runs[ours_name] for x in r["tokens"][1:]])
    t_train = statistics.median(pooled(ours_name, "train"))
    flops = train_flops(models["policy"], tokens, tokens / BATCH, EPOCHS)
    peak = a.peaks["bf16" if bf16 else "fp32"]
    print(f"ours' train phase: {tokens:.0f} tokens/step (mean sequence {tokens / BATCH:.1f}), {flops / 1e12:.2f} "
          f"TFLOP (actor + critic, {EPOCHS} epochs) in {t_train:.2f} s = {flops / t_train / 1e9:.1f} GFLOP/s, "
          f"MFU {flops / t_train / 1e9 / peak:.1%} of {peak:.0f} GFLOP/s (2-thread matmul probe)")
    step_tflop = [x for r in runs[ours_name] for x in r["step_tflop"][1:]]
    if step_tflop:  # the whole step's model FLOPs as ours counts them (perf/model_tflops), the same work on both sides
        f = statistics.median(step_tflop) * 1e12
        print("MFU of the whole step (ours' counted model FLOPs of the step, " + f"{f / 1e12:.2f} TFLOP, / step time / "
              f"probe peak): " + ", ".join(f"{name} {f / med[name] / 1e9 / peak:.1%}" for name in sides))
    kl0 = " ".join(f"{x:.3g}" if x is not None else "-" for x in (r["rollout_vs_trainer"] for r in runs[ours_name]))
    print(f"ours' step-0 kl/rollout_vs_trainer per round: {kl0}" + (f" (run with {a.extra[0]})" if a.extra else ""))
    print(f"per-round ratios ours / {best}: {fmt(per_round)}")
    print(f"[{precision}] ratio ours / TRL (fastest: {best}) = {med[ours_name] / med[best]:.2f} "
          f"(target <= {a.target})\n", flush=True)
    tag = "bf16" if bf16 else "fp32"
    return {f"{name}, {tag}": m for name, m in med.items()}


if __name__ == "__main__":
    main()
