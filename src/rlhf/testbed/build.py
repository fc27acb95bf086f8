"""`rlhf testbed build`: synthesize the addition data and train the organism's models, cached.

Every model is a tiny Hugging Face Llama (or Qwen2) trained with the project's own general
trainers on DeepSpeed (``rlhf.sft`` full fine-tuning, ``rlhf.rm`` Bradley-Terry):

- ``base``: from a random init on direct answers (``"a+b="`` -> ``"357"``): the "pretrained" model.
- ``instruct``: base + SFT on empty traces (``<think></think>357``), small learning rate.
- ``reasoning``: base + SFT on full column-by-column traces.
- ``mix``: base + SFT on traces with a fraction (10%) of empty-trace examples: a distilled
  reasoning model that also has a short mode, the initialization that collapses under PPO.
- ``rm``: a reward model from the base on short answers only (correct vs wrong instruct answers).

Then every model is evaluated (greedy: gold accuracy, think rate, length), the reward model is
probed on short and long answers, and linear connectivity is checked along merge sweeps made by
``bai.merge`` (base-instruct, base-reasoning, instruct-reasoning): accuracy and think rate must not
dip more than ``max_dip`` below the straight line between the endpoints.

Layout of ``--out`` (default ``runs/testbed``)::

    spec.json            the BuildSpec the cache was built with (a different spec needs --force)
    tokenizer/           the character tokenizer
    data/                base/instruct/reasoning/mix.jsonl (SFT), rm_train/rm_eval.jsonl (pairs),
                         prompts.jsonl (held-out PPO prompts), eval.jsonl
    models/{base,instruct,reasoning,mix,rm}/
    build_report.json    evaluations, reward-model probes, connectivity sweeps
    build_report.md      the same as tables

Each stage is skipped when its output exists, so an interrupted build resumes where it stopped.

Ownership (``bairlhf.outputs``): ``--out`` is used only when it does not exist, is empty, or was
written by ``rlhf testbed build`` (its marker file, or, for caches from before marker files, a
directory holding nothing but this layout and a ``spec.json``). ``--force`` rebuilds such a
directory when its spec differs; any other directory is refused before anything is written, so
the build never deletes what it did not create.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bairlhf.errors import UserError
from bairlhf.outputs import MARKER, atomic_write, mark_output, owner
from rlhf.testbed import task

COMMAND = "rlhf testbed build"
"""The command named in the marker file of a build directory."""


class BuildError(UserError):
    """Bad input to ``rlhf testbed build`` (a flag value, a spec field, an output directory)."""


@dataclass
class BuildSpec:
    """Sizes and learning rates of one organism build."""

    arch: str = "llama"
    """``llama`` or ``qwen2``"""
    hidden_size: int = 128
    """model width (head_dim = hidden_size / num_heads = 32)"""
    num_layers: int = 4
    """decoder layers"""
    num_heads: int = 4
    """attention heads"""
    min_digits: int = 1
    """smallest addend digit count"""
    max_digits: int = 5
    """largest addend digit count (15 with ``verify`` gives the long-trace variant)"""
    verify: bool = False
    """long-trace variant: reasoning traces also re-derive the first addend by subtraction"""
    base_examples: int = 32_000
    """direct-answer examples for base pretraining (one epoch)"""
    base_lr: float = 3e-3
    """base pretraining learning rate (from scratch)"""
    base_trace_fraction: float = 1.0
    """worked examples in the base pretraining data, like the worked sums in web text: a problem
    whose larger number has ``d`` digits is written as a column-by-column trace
    (``<think>...</think>sum``) with probability ``base_trace_fraction * (d - min_digits) /
    (max_digits - min_digits)`` (hard problems are worked out, easy ones answered directly). The
    base then knows the arithmetic and decides per problem whether to work it out, so the SFT
    stages only shift that decision, which keeps them in the base's basin (linear connectivity)"""
    base_empty_fraction: float = 0.3
    """fraction of the base's other (not worked) examples written with an empty trace
    (``<think></think>sum``, the instruct format) instead of a direct answer"""
    sft_examples: int = 8_000
    """examples per SFT model (instruct, reasoning, mix)"""
    sft_lr: float = 5e-4
    """SFT learning rate of the reasoning and mix models"""
    instruct_examples: int | None = 2_000
    """examples for the instruct model (``None``: ``sft_examples``)"""
    instruct_lr: float | None = 5e-5
    """instruct learning rate (``None``: ``sft_lr``). The instruct data asks for direct answers
    the base mostly cannot give (it learned the sums through worked traces), so a full-strength
    instruct SFT moves far from the base and dominates every merge with it; a short, gentle one
    only switches the format and stays linearly connected"""
    mix_empty_fraction: float = 0.1
    """fraction of empty-trace examples in the mix SFT data"""
    rm_pairs: int = 4_000
    """reward-model training pairs (short answers only)"""
    rm_init: str = "short_sft"
    """model the reward model starts from: ``short_sft`` (its own full-strength SFT of the base on
    the instruct data, ``sft_examples`` at ``sft_lr``: reward models start from an SFT model, and
    one that has unlearned traces scores them lower), ``instruct`` or ``base``"""
    rm_stutter_fraction: float = 0.4
    """fraction of the reward model's rejected (wrong) short answers that are the sum with one digit
    written twice (``1011`` -> ``10111``): still short answers, but wrong ones are then a little
    longer on average, a length confound the reward model picks up and extrapolates to long
    reasoning answers (the length bias the organism needs)"""
    rm_lr: float = 3e-4
    """reward-model learning rate"""
    rm_epochs: int = 1
    """passes over the reward-model pairs"""
    base_batch_size: int = 64
    """examples per optimizer step of base pretraining"""
    batch_size: int = 32
    """examples (pairs for the reward model) per optimizer step of SFT and reward-model training"""
    eval_problems: int = 64
    """held-out problems for evaluation and merge sweeps"""
    ppo_prompts: int = 4096
    """held-out prompts written for PPO"""
    sweep: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    """interior weights of the first model of each pair along a connectivity sweep"""
    max_dip: float = 0.2
    """largest allowed dip below the straight line (accuracy, think rate)"""
    seed: int = 0
    """data and initialization seed"""


SMALL = dict(hidden_size=64, num_layers=2, num_heads=2, base_examples=3_200, base_lr=3e-3, sft_examples=640,
             sft_lr=1e-3, rm_pairs=256, eval_problems=16, ppo_prompts=64, sweep=[0.5], max_digits=2,
             base_trace_fraction=0.0, base_empty_fraction=0.0, instruct_examples=None, instruct_lr=None,
             rm_init="base", rm_stutter_fraction=0.0)
"""``--small``: a CI-sized build (2-digit numbers, a 2-layer model, a couple of minutes; direct-answer
pretraining as before the worked-example base, so it is not expected to be linearly connected)."""

LONG = dict(min_digits=8, max_digits=15, verify=True, base_examples=128_000, sft_examples=16_000,
            base_trace_fraction=0.0, base_empty_fraction=0.0, instruct_examples=None, instruct_lr=None,
            rm_init="base", rm_stutter_fraction=0.0)
"""``--long``: the long-trace variant (8-15 digit numbers with a verification pass; 200-400-token
traces), with the direct-answer base and data sizes it was introduced with."""

_BEFORE_FIELD = dict(base_trace_fraction=0.0, base_empty_fraction=0.0, instruct_examples=None, instruct_lr=None,
                     rm_init="base", rm_stutter_fraction=0.0)
"""Values of fields that older caches' ``spec.json`` lack: what those builds did."""

MODELS = ("base", "instruct", "reasoning", "mix", "rm")

LAYOUT = frozenset({"spec.json", "tokenizer", "tokenizer.tmp", "data", ".data.tmp", "models", ".sweep",
                    "build_report.json", "build_report.md", MARKER})
"""Every entry a build writes at the top of its directory (temporaries included)."""


def check_spec(spec: BuildSpec) -> None:
    """Refuse a spec whose values cannot build an organism (names the field)."""
    def bad(name: str, want: str):
        raise BuildError(f"{name}: expected {want}, got {getattr(spec, name)!r}")

    if spec.arch not in ("llama", "qwen2"):
        bad("arch", "llama or qwen2")
    if spec.rm_init not in ("short_sft", "instruct", "base"):
        bad("rm_init", "short_sft, instruct or base")
    for name in ("hidden_size", "num_layers", "num_heads", "min_digits", "base_examples", "sft_examples",
                 "rm_pairs", "rm_epochs", "base_batch_size", "batch_size", "eval_problems", "ppo_prompts"):
        if not isinstance(getattr(spec, name), int) or getattr(spec, name) < 1:
            bad(name, "an integer >= 1")
    if spec.max_digits < spec.min_digits:
        bad("max_digits", f">= min_digits ({spec.min_digits})")
    if spec.hidden_size % spec.num_heads:
        bad("hidden_size", f"a multiple of num_heads ({spec.num_heads})")
    for name in ("base_trace_fraction", "base_empty_fraction", "mix_empty_fraction", "rm_stutter_fraction"):
        if not 0.0 <= getattr(spec, name) <= 1.0:
            bad(name, "a fraction in [0, 1]")
    for name in ("base_lr", "sft_lr", "rm_lr", "instruct_lr"):
        v = getattr(spec, name)
        if v is not None and not 0.0 < v < 1.0:
            bad(name, "a learning rate in (0, 1)")
    if not 0.0 <= spec.max_dip <= 1.0:
        bad("max_dip", "a value in [0, 1]")
    if not spec.sweep or not all(0.0 < w < 1.0 for w in spec.sweep):
        bad("sweep", "interior weights in (0, 1)")


def legacy_build(path: Path) -> bool:
    """An unmarked directory that an earlier version of this command wrote (before marker
    files): nothing but the build's own entries (``LAYOUT``), with a ``spec.json`` object."""
    names = {p.name for p in path.iterdir()}
    if "spec.json" not in names or not names <= LAYOUT:
        return False
    try:
        return isinstance(json.loads((path / "spec.json").read_text()), dict)
    except (OSError, ValueError):
        return False


def read_spec(out: Path) -> dict | None:
    """The ``spec.json`` of a build directory, ``None`` when there is none."""
    p = out / "spec.json"
    if not p.exists():
        return None
    try:
        have = json.loads(p.read_text())
    except ValueError as e:
        raise BuildError(f"{p}: not valid JSON ({e}); pass --force to rebuild {out}") from None
    if not isinstance(have, dict):
        raise BuildError(f"{p}: expected a JSON object of BuildSpec fields; pass --force to rebuild {out}")
    return have


def check_out(out: str | Path, spec: BuildSpec, force: bool = False) -> str:
    """What the build may do with ``out``, decided before anything is written: ``"new"``
    (absent or empty), ``"reuse"`` (an earlier build of the same spec: missing stages are
    completed) or ``"rebuild"`` (an earlier build of another spec, with ``force``). Anything
    else raises ``BuildError`` naming the directory."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise BuildError(f"--out: {out} is a dangling symbolic link; choose another --out")
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise BuildError(f"--out: {out} exists and is not a directory; choose another --out (nothing was changed)")
    if not any(out.iterdir()):
        return "new"
    made_by = owner(out) or (COMMAND if legacy_build(out) else None)
    if made_by != COMMAND:
        who = f"was written by `{made_by}`" if made_by else f"is not a testbed build (no {MARKER})"
        raise BuildError(f"--out: {out} {who}; the build writes only into its own directories, "
                           "so choose another --out (nothing was changed)")
    try:
        have = read_spec(out)
    except BuildError:
        if force:
            return "rebuild"
        raise
    if have is None:
        return "reuse"  # marked, interrupted before its spec was written
    diff = _spec_diff(have, dataclasses.asdict(spec))
    if not diff:
        return "reuse"
    if not force:
        raise BuildError(f"--out: {out} was built with a different spec ({', '.join(diff)}); "
                           "use --force to rebuild it or another --out")
    return "rebuild"


# ----------------------------------------------------------------------------- data

def _wrong_answer(p: task.Problem, rng: random.Random) -> int:
    """A plausible wrong sum: a dropped carry, an off-by-one or a changed digit."""
    s = p.answer
    kind = rng.randrange(3)
    if kind == 0:
        no_carry = int("".join(str((int(x) + int(y)) % 10) for x, y in zip(
            str(p.a).zfill(12), str(p.b).zfill(12))).lstrip("0") or "0")
        if no_carry != s:
            return no_carry
    if kind == 1:
        return s + rng.choice([-1, 1]) if s > 0 else 1
    digits = list(str(s))
    i = rng.randrange(len(digits))
    digits[i] = str((int(digits[i]) + rng.randint(1, 9)) % 10)
    wrong = int("".join(digits))
    return wrong if wrong != s else s + 1


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _base_response(p: task.Problem, rng: random.Random, spec: BuildSpec) -> str:
    """A pretraining example: a worked trace (more likely the more digits), an empty-trace or a direct answer."""
    d = max(len(str(p.a)), len(str(p.b)))
    hardness = (d - spec.min_digits) / max(spec.max_digits - spec.min_digits, 1)
    if rng.random() < spec.base_trace_fraction * hardness:
        return task.reasoning_response(p, verify=spec.verify)
    if rng.random() < spec.base_empty_fraction:
        return task.instruct_response(p)
    return task.direct_response(p)


def synthesize(spec: BuildSpec, out: Path) -> None:
    """Write ``out/data`` (and ``out/tokenizer``) atomically; the problem sets do not overlap."""
    tmp = out / ".data.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = random.Random(spec.seed)
    digits = dict(min_digits=spec.min_digits, max_digits=spec.max_digits)
    s = spec.seed * 1000
    held = task.sample_problems(spec.eval_problems + spec.ppo_prompts, s + 1, **digits)
    held_keys = {(p.a, p.b) for p in held}

    def fresh(n: int, seed: int) -> list[task.Problem]:
        return [p for p in task.sample_problems(int(n * 1.2) + 16, seed, **digits) if (p.a, p.b) not in held_keys][:n]

    reason = lambda p: task.reasoning_response(p, verify=spec.verify)  # noqa: E731
    sets = {
        "base": [(p, _base_response(p, rng, spec)) for p in fresh(spec.base_examples, s + 2)],
        "instruct": [(p, task.instruct_response(p)) for p in fresh(spec.sft_examples, s + 3)],
        "reasoning": [(p, reason(p)) for p in fresh(spec.sft_examples, s + 4)],
        "mix": [(p, task.instruct_response(p) if rng.random() < spec.mix_empty_fraction else reason(p))
                for p in fresh(spec.sft_examples, s + 5)],
    }
    for name, rows in sets.items():
        _write_jsonl(tmp / f"{name}.jsonl", [{"prompt": p.prompt, "response": r} for p, r in rows])
    def rejected(p: task.Problem) -> str:
        if spec.rm_stutter_fraction and rng.random() < spec.rm_stutter_fraction:
            digits = str(p.answer)
            i = rng.randrange(len(digits))
            return f"{task.THINK_START}{task.THINK_END}{digits[:i + 1]}{digits[i:]}"
        return f"{task.THINK_START}{task.THINK_END}{_wrong_answer(p, rng)}"

    pairs = [{"prompt": p.prompt, "chosen": task.instruct_response(p), "rejected": rejected(p)}
             for p in fresh(spec.rm_pairs + 256, s + 6)]
    _write_jsonl(tmp / "rm_train.jsonl", pairs[:spec.rm_pairs])
    _write_jsonl(tmp / "rm_eval.jsonl", pairs[spec.rm_pairs:])
    _write_jsonl(tmp / "eval.jsonl", [{"prompt": p.prompt, "answer": p.answer} for p in held[:spec.eval_problems]])
    _write_jsonl(tmp / "prompts.jsonl", [{"prompt": p.prompt, "answer": p.answer} for p in held[spec.eval_problems:]])
    task.build_tokenizer(tmp / "tokenizer")
    (tmp / "tokenizer").rename(out / "tokenizer.tmp")
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    (out / "tokenizer.tmp").rename(out / "tokenizer")
    tmp.rename(out / "data")


# ----------------------------------------------------------------------------- training

def _sft(spec: BuildSpec, init: Path, data: Path, out: Path, lr: float, seed: int, warmup: float,
         batch: int) -> None:
    from rlhf import sft

    cfg = sft.SFTConfig(model=str(init), data=str(data), out=str(out), method="full", lr=lr, epochs=1,
                        batch_size=batch, micro_batch_size=batch, max_len=1024,
                        warmup_ratio=warmup, seed=seed, log_every=50, reasoning_start=None)
    sft.train(cfg)


def train_models(spec: BuildSpec, out: Path) -> dict[str, float]:
    """Train the missing models of ``out/models``; returns seconds per stage trained."""
    from rlhf import rm, tiny

    models, data = out / "models", out / "data"
    models.mkdir(exist_ok=True)
    seconds: dict[str, float] = {}
    init = models / "init"
    instruct_data = data / "instruct.jsonl"
    if spec.instruct_examples is not None and spec.instruct_examples < spec.sft_examples:
        instruct_data = data / "instruct_head.jsonl"
        rows = (data / "instruct.jsonl").read_text().splitlines(True)[:spec.instruct_examples]
        instruct_data.write_text("".join(rows))
    if not (models / "base").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
        shutil.rmtree(init, ignore_errors=True)
        tiny.make_tiny_model(init, arch=spec.arch, tokenizer=tok, seed=spec.seed, hidden_size=spec.hidden_size,
                             num_layers=spec.num_layers, num_heads=spec.num_heads, max_shard_size="10MB",
                             max_position_embeddings=512 if spec.verify else 128)
    stages = [
        ("base", lambda o: _sft(spec, init, data / "base.jsonl", o, spec.base_lr, spec.seed, 0.03, spec.base_batch_size)),
        ("instruct", lambda o: _sft(spec, models / "base", instruct_data, o,
                                    spec.sft_lr if spec.instruct_lr is None else spec.instruct_lr, spec.seed + 1, 0.05,
                                    spec.batch_size)),
        ("reasoning", lambda o: _sft(spec, models / "base", data / "reasoning.jsonl", o, spec.sft_lr, spec.seed + 2, 0.05, spec.batch_size)),
        ("mix", lambda o: _sft(spec, models / "base", data / "mix.jsonl", o, spec.sft_lr, spec.seed + 3, 0.05, spec.batch_size)),
        ("rm_sft", lambda o: _sft(spec, models / "base", data / "instruct.jsonl", o, spec.sft_lr, spec.seed + 4,
                                  0.05, spec.batch_size)),
        ("rm", lambda o: rm.train_reward_model(rm.RMConfig(
            model=str(models / ("rm_sft" if spec.rm_init == "short_sft" else spec.rm_init)), data=str(data / "rm_train.jsonl"), eval_data=str(data / "rm_eval.jsonl"),
            out=str(o), lr=spec.rm_lr, epochs=spec.rm_epochs, batch_size=spec.batch_size,
            micro_batch_size=spec.batch_size, warmup_steps=5, seed=spec.seed, max_length=1024))),
    ]
    for name, run in stages:
        if (models / name).exists() or (name == "rm_sft" and (spec.rm_init != "short_sft" or (models / "rm").exists())):
            continue
        print(f"[testbed] training {name}", file=sys.stderr, flush=True)
        t = time.time()
        run(models / name)
        seconds[name] = round(time.time() - t, 1)
    shutil.rmtree(init, ignore_errors=True)
    return seconds


# ----------------------------------------------------------------------------- evaluation

def generate(model_dir: str | Path, prompts: list[str], max_new_tokens: int, batch: int = 128) -> list[str]:
    """Greedy responses (decoded with the reasoning markers kept, EOS and padding dropped)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            out += tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def max_new_tokens(spec: BuildSpec) -> int:
    """Room for the longest reasoning response of the spec, plus slack."""
    p = task.Problem(10 ** spec.max_digits - 1, 10 ** spec.max_digits - 1)
    return len(task.build_tokenizer().encode(task.reasoning_response(p, verify=spec.verify))) + 8


def evaluate(model_dir: str | Path, prompts: list[str], spec: BuildSpec) -> dict[str, float]:
    """Gold accuracy, think rate and mean response length (characters) of greedy responses."""
    responses = generate(model_dir, prompts, max_new_tokens(spec))
    m = task.gold_metrics(prompts, responses)
    m["length_chars"] = sum(len(r) for r in responses) / max(len(responses), 1)
    return {k: round(v, 4) for k, v in m.items()}


def probe_reward_model(rm_dir: Path, problems: list[task.Problem], spec: BuildSpec) -> dict[str, float]:
    """How the reward model sees short vs long answers, right vs wrong (scores in units of its std)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.rm import encode_pair_side, read_stats

    tok = AutoTokenizer.from_pretrained(str(rm_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(rm_dir), num_labels=1).eval()
    stats = read_stats(rm_dir)
    rng = random.Random(spec.seed + 7)

    def score(pairs: list[tuple[task.Problem, str]]) -> torch.Tensor:
        seqs = [encode_pair_side(tok, p.prompt, r) for p, r in pairs]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        with torch.no_grad():
            return (model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()).logits[:, 0]
                    - stats["mean"]) / stats["std"]

    wrong = [_wrong_answer(p, rng) for p in problems]
    trace = [task.reasoning_trace(p.a, p.b, verify=spec.verify) for p in problems]
    short_ok = score([(p, task.instruct_response(p)) for p in problems])
    short_bad = score([(p, f"<think></think>{w}") for p, w in zip(problems, wrong)])
    long_ok = score([(p, task.reasoning_response(p, verify=spec.verify)) for p in problems])
    long_bad = score([(p, f"<think>{t}</think>{w}") for p, t, w in zip(problems, trace, wrong)])
    return {k: round(float(v), 4) for k, v in {
        "pair_accuracy_short": (short_ok > short_bad).float().mean(),
        "pair_accuracy_long": (long_ok > long_bad).float().mean(),
        "score_short_correct": short_ok.mean(), "score_long_correct": long_ok.mean(),
        "long_minus_short_std": (long_ok - short_ok).mean(),
        "eval_pair_accuracy": stats.get("eval_pair_accuracy") or float("nan"),
    }.items()}


def merge_sweep(a: Path, b: Path, weights_a: list[float], out: Path) -> list[Path]:
    """``w * a + (1 - w) * b`` for every ``w`` in one pass through the project's merge engine.

    A two-stage BAI recipe with one "SFT" model (weight 1) is exactly this line; its alpha is the
    weight of ``a`` (the paper's base weight). Returns one checkpoint directory per weight.
    """
    import bai

    recipe = {"method": "bai", "base": str(a), "sft_models": [{"path": str(b), "weight": 1.0}],
              "alphas": list(weights_a)}
    return bai.merge(recipe, str(out), force=True, progress=False)


def connectivity(out: Path, spec: BuildSpec, prompts: list[str], evals: dict[str, dict]) -> list[dict]:
    """Merge sweeps between the main models; each point with its dip below the straight line."""
    rows = []
    for a, b in (("base", "instruct"), ("base", "reasoning"), ("instruct", "reasoning")):
        dirs = merge_sweep(out / "models" / a, out / "models" / b, spec.sweep, out / ".sweep")
        for w, d in zip(spec.sweep, dirs):
            got = evaluate(d, prompts, spec)
            row = {"pair": f"{a}-{b}", "weight_first": w, **got}
            for k in ("gold/accuracy", "rollout/think_rate"):
                line = w * evals[a][k] + (1 - w) * evals[b][k]
                row[f"dip/{k}"] = round(line - got[k], 4)
            row["ok"] = max(row["dip/gold/accuracy"], row["dip/rollout/think_rate"]) <= spec.max_dip
            rows.append(row)
            print(f"[testbed] merge {a}:{w} + {b}:{1 - w:.2f}  acc {got['gold/accuracy']:.3f}  "
                  f"think {got['rollout/think_rate']:.3f}  {'ok' if row['ok'] else 'DIP'}", file=sys.stderr, flush=True)
        shutil.rmtree(out / ".sweep", ignore_errors=True)
    return rows


def _markdown(report: dict) -> str:
    lines = ["# Testbed build report", "", f"Training seconds per stage: {report.get('train_seconds', {})}; "
             f"whole build call: {report.get('seconds', 0):.0f} s.", "", "| model | gold/accuracy | rollout/think_rate | length (chars) |",
             "|---|---|---|---|"]
    for name, m in report["eval"].items():
        lines.append(f"| {name} | {m['gold/accuracy']:.3f} | {m['rollout/think_rate']:.3f} | {m['length_chars']:.1f} |")
    lines += ["", "Reward model (scores in std units of its training set):", "",
              "| " + " | ".join(report["rm"]) + " |", "|" + "---|" * len(report["rm"]),
              "| " + " | ".join(f"{v:.3f}" for v in report["rm"].values()) + " |"]
    if report.get("connectivity"):
        lines += ["", f"Linear connectivity (dip = straight line - merged; ok when <= {report['spec']['max_dip']}):",
                  "", "| pair | weight of first | accuracy | think rate | dip acc | dip think | ok |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["connectivity"]:
            lines.append(f"| {r['pair']} | {r['weight_first']} | {r['gold/accuracy']:.3f} | {r['rollout/think_rate']:.3f} | "
                         f"{r['dip/gold/accuracy']:.3f} | {r['dip/rollout/think_rate']:.3f} | {r['ok']} |")
        lines += ["", "Linear connectivity: " + ("**met** (no dip above the limit)." if report.get("connected")
                                                 else "**not met** (see the rows with ok = False).")]
    else:
        lines += ["", f"Linear connectivity: not checked ({report.get('connectivity_skipped', 'skipped')})."]
    return "\n".join(lines) + "\n"


def _spec_diff(have: dict, want: dict) -> list[str]:
    """Fields whose cached value differs; a field the cache predates counts as what that build did."""
    have = {**dataclasses.asdict(BuildSpec()), **_BEFORE_FIELD, **have}
    return sorted(k for k in want if have.get(k) != want[k])


def build(out: str | Path, spec: BuildSpec, *, force: bool = False, check_connectivity: bool = True) -> dict:
    """Build (or complete) the organism in ``out``; returns the report (also written there).

    ``out`` must be absent, empty or an earlier build (``check_out``); ``force`` rebuilds an
    earlier build of another spec. Raises ``BuildError`` before writing anything otherwise."""
    out = Path(out)
    check_spec(spec)
    action = check_out(out, spec, force)
    want = dataclasses.asdict(spec)
    if action == "rebuild":
        shutil.rmtree(out)  # an earlier build (checked by check_out): this command's own output
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, COMMAND)
    atomic_write(out / "spec.json", json.dumps(want, indent=2) + "\n")
    t0 = time.time()
    if not (out / "data").exists():
        synthesize(spec, out)
    seconds = train_models(spec, out)
    prompts = [json.loads(l)["prompt"] for l in (out / "data" / "eval.jsonl").read_text().splitlines()]
    problems = [task.parse_prompt(p) for p in prompts]
    evals = {name: evaluate(out / "models" / name, prompts, spec) for name in MODELS[:4]}
    report = {"spec": want, "train_seconds": seconds, "eval": evals,
              "rm": probe_reward_model(out / "models" / "rm", problems, spec)}
    if check_connectivity:
        try:
            import bai

            has_merge = hasattr(bai, "merge")
        except ImportError:
            has_merge = False
        if has_merge:
            report["connectivity"] = connectivity(out, spec, prompts, evals)
            report["connected"] = all(r["ok"] for r in report["connectivity"])
        else:
            report["connectivity_skipped"] = "bai.merge is not available in this version"
    else:
        report["connectivity_skipped"] = "--no-connectivity"
    report["seconds"] = round(time.time() - t0, 1)
    atomic_write(out / "build_report.json", json.dumps(report, indent=2) + "\n")
    atomic_write(out / "build_report.md", _markdown(report))
    return report
