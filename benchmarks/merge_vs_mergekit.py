"""Benchmark: `bai merge` against mergekit 0.1.5 and against a plain copy of the same bytes.

Generates three random bf16 Llama checkpoints (base + two SFTs, >= 1 GB each by default) directly
as safetensors shards (no torch model is built), then times, each in a fresh process (wall time
and peak RSS of the whole command, CLI start-up included):

  (a) one BAI merge (alpha 0.5, SFT weights 0.5/0.5)  vs  mergekit-yaml on the equivalent linear
      recipe (weights 0.5/0.25/0.25, mergekit's default dtype handling);
  (b) a 9-ratio sweep (alpha 0.1 .. 0.9) in one `bai merge`  vs  9 mergekit-yaml runs;
  (c) a plain copy of the same bytes (read every input file once into one reused buffer, write
      the output bytes: one output for (a), nine for (b)), the I/O floor.

Prints times, peak RSS and the ratios: throughput = bytes moved / wall time, so the ratio of
throughputs is the inverse ratio of wall times. Outputs are deleted and the page cache flushed
(`sync`, untimed) before every timed run; inputs stay in page cache (warm read).

    python benchmarks/merge_vs_mergekit.py --workdir /tmp/bai_bench     # ~1.08 GB per checkpoint
    python benchmarks/merge_vs_mergekit.py --workdir /tmp/bai_bench --single --repeat 5 --keep
        # only (a)'s BAI merge and (c)'s one-output copy, alternated 5 times: each run's time and
        # load average, then the medians (no mergekit, no sweep; a loaded machine's noise shows)
"""

from __future__ import annotations

import argparse
import json
import statistics
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ALPHAS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def llama_shapes(hidden: int, inter: int, layers: int, vocab: int, heads: int, kv_heads: int) -> dict:
    """Tensor names and shapes of a LlamaForCausalLM (untied head)."""
    hd = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * hd, hidden), p + "self_attn.k_proj.weight": (kv_heads * hd, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * hd, hidden), p + "self_attn.o_proj.weight": (hidden, heads * hd),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter)})
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def make_checkpoint(out: Path, shapes: dict, seed: int, shard_bytes: int, config: dict) -> int:
    """Random bf16 weights written as safetensors shards with an index; returns the bytes written."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards, cur, size, total = [], {}, 0, 0
    for name, shape in shapes.items():
        t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if cur and size + t.nbytes > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += t.nbytes
        total += t.nbytes
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "bos_token_id": 1}))
    return total


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run a command in a fresh process; return (wall seconds, peak RSS in GB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-3000:]}")
    return dt, usage.ru_maxrss / 1e6      # ru_maxrss is in KiB on Linux


def fresh(*paths: Path) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)
    subprocess.run(["sync"], check=True)


COPY_SCRIPT = """
import sys
from pathlib import Path
inputs, outs = [Path(p) for p in sys.argv[1].split(',')], [Path(p) for p in sys.argv[2].split(',')]
files = sorted(inputs[0].glob('*.safetensors'))
buf = bytearray(8 << 20)                           # one reused buffer, as the merge reuses its own
view = memoryview(buf)
for o in outs:                                     # the output bytes: one copy of a checkpoint per output
    o.mkdir(parents=True)
    for f in files:
        with open(f, 'rb', buffering=0) as src, open(o / f.name, 'wb', buffering=0) as dst:
            while n := src.readinto(buf):
                dst.write(view[:n])
for d in inputs[1:]:                               # every other input byte read once
    for f in sorted(d.glob('*.safetensors')):
        with open(f, 'rb', buffering=0) as src:
            while src.readinto(buf):
                pass
"""


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def single(args, ins: list[Path], out: Path, bai_yaml: Path, bin_dir: Path, env: dict, moved: int,
           work: Path) -> int:
    """``--single``: copy1 and bai1 alternated ``--repeat`` times, each with the load average before it."""
    rows = {"copy1": [], "bai1": []}
    cmds = {"copy1": [sys.executable, "-c", COPY_SCRIPT, ",".join(map(str, ins)), str(out / "c")],
            "bai1": [str(bin_dir / "bai"), "merge", str(bai_yaml), "--out", str(out / "b"), "--no-progress"]}
    for i in range(args.repeat):
        for k, cmd in cmds.items():
            fresh(out)
            load = loadavg()
            t, r = timed(cmd, env)
            rows[k].append((t, r))
            print(f"run {i + 1}  {k:6s} {t:8.2f} s   {moved / t / 1e9:5.2f} GB/s moved   peak RSS {r:5.2f} GB"
                  f"   load {load}", flush=True)
        print(f"run {i + 1}  merge at {rows['copy1'][-1][0] / rows['bai1'][-1][0]:.0%} of the copy's throughput",
              flush=True)
    fresh(out)
    med = {k: statistics.median(t for t, _ in v) for k, v in rows.items()}
    ratios = [c / b for (c, _), (b, _) in zip(rows["copy1"], rows["bai1"])]
    print(f"median of {args.repeat}: copy1 {med['copy1']:.2f} s, bai1 {med['bai1']:.2f} s (peak RSS "
          f"{max(r for _, r in rows['bai1']):.2f} GB); one merge at {statistics.median(ratios):.0%} of the copy's "
          f"throughput (median of the per-run ratios; target >= 90%)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/bai_bench", help="where checkpoints and outputs go (deleted at the end)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints (a later run reuses them)")
    ap.add_argument("--single", action="store_true", help="only the one-output copy and one BAI merge (no "
                    "mergekit, no sweep)")
    ap.add_argument("--repeat", type=int, default=1, help="with --single: alternate copy and merge this many "
                    "times; prints each run with the load average, then the medians")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    work = Path(args.workdir)
    ins = [work / n for n in ("base", "sft_a", "sft_b")]
    shapes = llama_shapes(args.hidden, args.intermediate, args.layers, args.vocab, 16, 8)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
              "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
              "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": args.vocab,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    if args.generate_only:
        for i, d in enumerate(ins):
            if not (d / "model.safetensors.index.json").exists():
                print(f"generating {d} ...", flush=True)
                make_checkpoint(d, shapes, seed=i, shard_bytes=600_000_000, config=config)
        return 0
    # generate in a child so this process stays small: a child's peak RSS (ru_maxrss) starts at
    # its parent's RSS at fork time
    subprocess.run([sys.executable, __file__, "--generate-only", *(argv if argv is not None else sys.argv[1:])],
                   check=True)
    size = sum(f.stat().st_size for f in ins[0].glob("*.safetensors"))
    print(f"checkpoints: 3 x {size / 1e9:.2f} GB bf16 Llama ({args.layers} layers, hidden {args.hidden})")
    for d in ins:                                              # warm the page cache
        for f in d.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass

    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    bai_yaml, sweep_yaml = work / "bai.yaml", work / "bai_sweep.yaml"
    common = (f"method: bai\nbase: {ins[0]}\nsft_models:\n  - {{path: {ins[1]}, weight: 0.5}}\n"
              f"  - {{path: {ins[2]}, weight: 0.5}}\ndtype: bfloat16\n")
    bai_yaml.write_text(common + "alpha: 0.5\n")
    sweep_yaml.write_text(common + f"alphas: {ALPHAS}\n")

    def mk_yaml(alpha: float) -> Path:
        p = work / f"mergekit_{alpha}.yml"
        p.write_text("merge_method: linear\nmodels:\n"
                     f"  - model: {ins[0]}\n    parameters: {{weight: {alpha}}}\n"
                     f"  - model: {ins[1]}\n    parameters: {{weight: {(1 - alpha) * 0.5}}}\n"
                     f"  - model: {ins[2]}\n    parameters: {{weight: {(1 - alpha) * 0.5}}}\n"
                     "dtype: bfloat16\n")
        return p

    out = work / "out"
    mk = [str(bin_dir / "mergekit-yaml"), "--no-cuda", "--copy-tokenizer", "--quiet"]
    res = {}
    if args.single:
        return single(args, ins, out, bai_yaml, bin_dir, env, 4 * size, work)
    fresh(out)
    res["copy1"] = timed([sys.executable, "-c", COPY_SCRIPT, ",".join(map(str, ins)), str(out / "c")], env)
    fresh(out)
    res["bai1"] = timed([str(bin_dir / "bai"), "merge", str(bai_yaml), "--out", str(out / "b"), "--no-progress"], env)
    fresh(out)
    res["mk1"] = timed(mk + [str(mk_yaml(0.5)), str(out / "m")], env)
    fresh(out)
    res["copy9"] = timed([sys.executable, "-c", COPY_SCRIPT, ",".join(map(str, ins)),
                          ",".join(str(out / f"c{a}") for a in ALPHAS)], env)
    fresh(out)
    res["bai9"] = timed([str(bin_dir / "bai"), "merge", str(sweep_yaml), "--out", str(out / "s"), "--no-progress"], env)
    fresh(out)
    runs = [timed(mk + [str(mk_yaml(a)), str(out / f"m{a}")], env) for a in ALPHAS]
    res["mk9"] = (sum(t for t, _ in runs), max(r for _, r in runs))
    fresh(out)

    moved = {"1": 4 * size, "9": 12 * size}      # bytes read + written: 3 inputs + 1 or 9 outputs
    for k, (t, r) in res.items():
        print(f"{k:6s} {t:8.2f} s   {moved[k[-1]] / t / 1e9:5.2f} GB/s moved   peak RSS {r:6.2f} GB")
    print(f"(a) one BAI merge vs mergekit linear:   {res['mk1'][0] / res['bai1'][0]:.2f}x throughput, "
          f"peak RSS {res['bai1'][1] / res['mk1'][1]:.2f}x mergekit's   (target >= 3x at <= 0.5x)")
    print(f"(b) 9-ratio sweep vs 9 mergekit runs:   {res['mk9'][0] / res['bai9'][0]:.2f}x throughput, "
          f"peak RSS {res['bai9'][1] / res['mk9'][1]:.2f}x   (target >= 5x)")
    print(f"(c) vs plain copy of the same bytes:    one merge {res['copy1'][0] / res['bai1'][0]:.0%}, "
          f"sweep {res['copy9'][0] / res['bai9'][0]:.0%} of the copy's throughput   (target >= 50%)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
