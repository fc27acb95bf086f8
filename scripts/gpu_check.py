#!/usr/bin/env python
"""One command that checks a GPU machine end to end (issue 14.5); ``scripts/gpu_check.sh`` wraps it.

Steps, in order, each in its own subprocess with its own timeout, under one overall budget
(``--budget``, default 600 s):

=============  ===========================================================================
``env``        hardware (``nvidia-smi``) and torch facts; decides what can run
``install``    CUDA torch (the ``constraints.txt`` pin, from the pip registry) and CUDA vLLM
               into the main ``.venv`` (skipped when already there)
``model``      the real-model fixture (``scripts/real_model.py``: SmolLM2-135M-Instruct, bf16)
``deepspeed``  DeepSpeed on CUDA: a few ZeRO-2 bf16 steps of the real model through
               ``DeepSpeedTrainEngine`` (accelerator, nccl group, device, finite loss, update)
``vllm``       vLLM on CUDA: generate, in-process reload, broadcast weight sync (values read back)
``vllm_nccl``  the same broadcast over NCCL (needs 2 GPUs: NCCL refuses two ranks on one GPU)
``megatron``   the megatron-core engine on CUDA at TP=1 (skipped when absent)
``train_hf``   ``rlhf train`` on the real model in bf16, transformers rollouts, a few steps
``train_vllm`` the same with vLLM rollouts
=============  ===========================================================================

It prints ONE table (step, status, seconds, step-0 mismatch ``kl/rollout_vs_trainer``, rollout
tokens/s, trainer tokens/s, MFU, note) and writes ``results.json`` and ``results.md`` (a markdown
table to paste into ``benchmarks/RESULTS.md``) plus one log per step into ``--out``.

Exit codes: 0 every step that ran passed; 1 a step failed; 2 bad usage (one stderr line);
3 no CUDA device (every GPU step skipped "no CUDA device"; ``--dry-run`` on a CPU machine too).

The CPU-side logic (arguments, skip decisions, table, result parsing, MFU) is plain functions
tested in CI (``tests/scale/test_gpu_check.py``); the step bodies (``step_*``) need a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without an installed package too

from bairlhf.errors import UserError  # noqa: E402
from rlhf.engines import accelerator as acc  # noqa: E402 (standard library only at import)

COMMAND = "gpu_check"
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NO_CUDA = 0, 1, 2, 3
STATUSES = ("pass", "fail", "skip")
NO_CUDA = "no CUDA device"
MIN_STEP_S = 20.0
"""A step is skipped ("budget exhausted") when less than this is left of ``--budget``."""
PPO_EPOCHS = 2
"""``ppo.ppo_epochs`` of the train steps (the tiny config's): trainer tokens/s counts each epoch."""
TRAIN_BATCH = 16
"""Prompts per step of the train steps (``ppo.rollout_batch_size``)."""
VLLM_VERSION = "0.32.0"
"""CUDA vLLM for the GPU path: the release that pins ``torch==2.13.0`` (``constraints.txt``'s pin);
it also pins ``transformers<5.20`` (the main venv's transformers is moved into that range)."""


@dataclass(frozen=True)
class Step:
    """One check."""

    name: str
    """Row name in the table (``[a-z_]+``)."""
    title: str
    """What it checks, one line."""
    timeout_s: float
    """Own wall-clock limit (> 0), cut to what is left of the budget."""
    needs_cuda: bool = True
    """Skipped with "no CUDA device" when the machine has none."""
    needs: tuple[str, ...] = ()
    """Steps that must have passed (else this one is skipped, naming the one that did not)."""


STEPS: tuple[Step, ...] = (
    Step("env", "hardware and torch facts", 60, needs_cuda=False),
    Step("install", f"CUDA torch + vllm=={VLLM_VERSION} into .venv", 480),
    Step("model", "real-model fixture (scripts/real_model.py)", 240),
    Step("deepspeed", "DeepSpeed ZeRO-2 bf16 steps on CUDA", 150, needs=("model",)),
    Step("vllm", "vLLM on CUDA: generate, reload, broadcast sync", 240, needs=("model",)),
    Step("vllm_nccl", "vLLM weight sync over NCCL (2 GPUs)", 180, needs=("model", "vllm")),
    Step("megatron", "megatron-core engine on CUDA, TP=1", 150, needs=("model",)),
    Step("train_hf", "rlhf train, bf16, transformers rollouts", 300, needs=("model",)),
    Step("train_vllm", "rlhf train, bf16, vLLM rollouts", 300, needs=("model", "vllm")),
)
STEP_NAMES = tuple(s.name for s in STEPS)
BY_NAME = {s.name: s for s in STEPS}


@dataclass
class Result:
    """What one step gave (also the JSON record)."""

    name: str
    status: str
    """``pass``, ``fail`` or ``skip``."""
    reason: str = ""
    """Why it failed or was skipped, or a note on a pass (one line)."""
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)
    """``mismatch`` (step-0 k3), ``mismatch_max_abs``, ``rollout_tok_s``, ``trainer_tok_s``,
    ``flops_per_token``, ``trainable_models``, ``mfu`` (filled by the parent from the peak)."""


# ---------------------------------------------------------------------------- arguments

def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0")
    return v


def _steps_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in STEP_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown step {', '.join(bad) or repr(text)}; steps: {', '.join(STEP_NAMES)}")
    return names


def _timeout_pair(text: str) -> tuple[str, float]:
    name, sep, val = text.partition("=")
    if not sep or name not in STEP_NAMES:
        raise argparse.ArgumentTypeError(f"{text!r}: expected STEP=SECONDS with STEP one of {', '.join(STEP_NAMES)}")
    return name, _positive(val)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, through main's UserError boundary
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    """The command line (``--help`` lists every option)."""
    ap = _Parser(prog="gpu_check", description="Check a GPU machine end to end and print one table "
                 "(exit 0 pass, 1 a step failed, 2 bad usage, 3 no CUDA device).")
    ap.add_argument("--out", default="runs/gpu_check", help="output directory (results.json, results.md, logs/, "
                    "run dirs); refused when it exists unless --force and an earlier gpu_check wrote it")
    ap.add_argument("--force", action="store_true", help="replace --out when an earlier gpu_check wrote it")
    ap.add_argument("--budget", type=_positive, default=600.0, help="seconds for the whole check (default 600)")
    ap.add_argument("--steps", type=_steps_list, default=STEP_NAMES, help="comma list of steps to run "
                    f"(default all: {','.join(STEP_NAMES)}); env always runs")
    ap.add_argument("--timeout", type=_timeout_pair, action="append", default=[], metavar="STEP=S",
                    help="override one step's timeout (repeatable)")
    ap.add_argument("--dry-run", action="store_true", help="detect the hardware, print the table of what "
                    "would run (every other step skipped), write nothing")
    ap.add_argument("--no-install", action="store_true", help="skip the install step (use the venv as it is)")
    ap.add_argument("--model", help="model directory for the GPU steps (default: the real-model fixture)")
    ap.add_argument("--python", help="interpreter of the step subprocesses (default: .venv/bin/python, "
                    "else this one)")
    ap.add_argument("--peak-tflops", type=_positive, help="dense bf16 peak of one GPU in TFLOP/s for MFU "
                    "(default: from the GPU name, accelerator.PEAK_TFLOPS_BF16)")
    ap.add_argument("--train-steps", type=int, default=3, help="PPO steps of the train steps (>= 1, default 3)")
    ap.add_argument("--rollout-check-tol", type=_positive, help="trainer.rollout_check_tol of the train steps "
                    "(default: the config's; a larger value lets a bf16 run past the step-0 check so its speed is measured)")
    ap.add_argument("--from-results", metavar="JSON", help="render the table of an earlier results.json and exit")
    # internal: the body of one step, run by the parent in a subprocess
    ap.add_argument("--run-step", choices=STEP_NAMES, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and cross-check the arguments (``UserError`` naming the option)."""
    args = build_parser().parse_args(argv)
    if args.train_steps < 1:
        raise UserError(f"--train-steps: {args.train_steps} must be >= 1")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        raise UserError(f"--model: {args.model} is not a model directory (no config.json)")
    if args.python is not None and not os.access(args.python, os.X_OK):
        raise UserError(f"--python: {args.python} is not an executable")
    if args.from_results is not None and not Path(args.from_results).is_file():
        raise UserError(f"--from-results: {args.from_results} does not exist")
    return args


# ---------------------------------------------------------------------------- facts and decisions

def parse_nvidia_smi(query_csv: str, header: str = "") -> dict:
    """GPUs from ``nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader``
    plus the driver's CUDA version from plain ``nvidia-smi``'s header ("CUDA Version: 12.8")."""
    gpus = []
    driver = ""
    for line in query_csv.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if not parts or not parts[0]:
            continue
        gpus.append({"name": parts[0], "memory": parts[1] if len(parts) > 1 else ""})
        driver = parts[2] if len(parts) > 2 else driver
    m = re.search(r"CUDA Version:\s*([0-9]+(?:\.[0-9]+)?)", header)
    return {"gpus": gpus, "driver": driver, "driver_cuda": m.group(1) if m else None}


def cuda_too_new(torch_cuda: str | None, driver_cuda: str | None) -> bool:
    """True when torch was built for a newer CUDA than the driver supports (major.minor)."""
    if not torch_cuda or not driver_cuda:
        return False

    def key(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split(".")[:2])

    return key(torch_cuda) > key(driver_cuda)


def has_cuda(facts: dict) -> bool:
    """A CUDA device is present: nvidia-smi lists one or torch sees one."""
    return bool(facts.get("smi", {}).get("gpus")) or bool(facts.get("torch", {}).get("cuda_available"))


def needs_ds_env(model_workers_source: str) -> bool:
    """The workers still default ``DS_ACCELERATOR`` to ``cpu`` (issue 14.4 not applied there), so
    the train steps must set ``DS_ACCELERATOR=cuda`` themselves."""
    return re.search(r"[\"']DS_ACCELERATOR[\"']\s*:\s*[\"']cpu[\"']", model_workers_source) is not None


def skip_reason(step: Step, facts: dict, opts: dict, done: dict[str, Result], left_s: float) -> str | None:
    """Why ``step`` is not run (None: run it). ``opts``: ``dry_run``, ``steps`` (selected names),
    ``no_install``, ``megatron_present``, ``model_given``; ``done``: results so far; ``left_s``:
    seconds left of the budget. The order of the tests is the order of the reasons' priority."""
    if step.name == "env":
        return None
    if step.needs_cuda and not has_cuda(facts):
        return NO_CUDA
    if opts.get("dry_run"):
        return "dry run"
    if step.name not in opts.get("steps", STEP_NAMES):
        return "not selected (--steps)"
    if step.name == "install" and opts.get("no_install"):
        return "--no-install"
    if step.name == "model" and opts.get("model_given"):
        return "--model given"
    if step.name == "vllm_nccl" and int(facts.get("torch", {}).get("device_count") or len(
            facts.get("smi", {}).get("gpus", []))) < 2:
        return "needs 2 GPUs: NCCL refuses two ranks on one GPU (the 1-GPU broadcast ran over gloo in vllm)"
    if step.name == "megatron" and not opts.get("megatron_present", True):
        return "rlhf.engines.megatron not present in this checkout"
    inst = done.get("install")
    if inst is not None and inst.status == "fail" and step.name != "model" and \
            not facts.get("torch", {}).get("cuda_available"):
        return "install failed and torch sees no CUDA device (see the install row)"
    for need in step.needs:
        r = done.get(need)
        if need == "model" and opts.get("model_given"):
            continue
        if r is not None and r.status != "pass":
            return f"needs {need} ({r.status})"
    if left_s < MIN_STEP_S:
        return f"budget exhausted ({left_s:.0f} s left)"
    return None


def exit_code(results: list[Result], facts: dict) -> int:
    """0 all ran passed, 1 any failed, 3 no CUDA device (documented in the module docstring)."""
    if any(r.status == "fail" for r in results):
        return EXIT_FAIL
    if not has_cuda(facts):
        return EXIT_NO_CUDA
    return EXIT_OK


# ---------------------------------------------------------------------------- results, MFU, table

def llama_param_count(cfg: dict) -> int:
    """Parameters of a Llama / Qwen2-style decoder from its ``config.json`` (GQA, tied or not)."""
    h, n_l, v = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["vocab_size"])
    inter = int(cfg["intermediate_size"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    hd = int(cfg.get("head_dim") or h // heads)
    attn = h * heads * hd * 2 + h * kv * hd * 2
    if cfg.get("model_type") == "qwen2":  # q, k, v biases
        attn += heads * hd + 2 * kv * hd
    elif cfg.get("attention_bias"):  # Llama: q, k, v and o biases
        attn += heads * hd + 2 * kv * hd + h
    mlp = 3 * h * inter + (2 * inter + h if cfg.get("mlp_bias") else 0)
    layer = attn + mlp + 2 * h
    emb = v * h * (1 if cfg.get("tie_word_embeddings", False) else 2)
    return emb + n_l * layer + h


def model_flops_per_token(cfg: dict, seq_len: int) -> float:
    """Training FLOPs per token of a model from its ``config.json`` (``accelerator.train_flops_per_token``)."""
    return acc.train_flops_per_token(llama_param_count(cfg), int(cfg["num_hidden_layers"]),
                                     int(cfg["hidden_size"]), seq_len)


def read_jsonl(path: Path) -> list[dict]:
    """Records of a ``metrics.jsonl`` (a torn last line, from a killed run, is ignored)."""
    out = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


_TOL_STOP = re.compile(r"kl/rollout_vs_trainer = ([0-9.eE+-]+) at step 0 exceeds")


def train_metrics(records: list[dict], stderr: str = "", ppo_epochs: int = PPO_EPOCHS) -> dict:
    """Table numbers of one ``rlhf train`` run from its ``metrics.jsonl`` records: ``mismatch`` (step-0
    ``kl/rollout_vs_trainer``, else the value in the trainer's stop message on ``stderr``),
    ``mismatch_max_abs``, ``rollout_tok_s`` (response tokens / generate time) and ``trainer_tok_s``
    (sequence tokens x PPO epochs / train time), medians over the steps after step 0 (all steps
    when there is only one), ``steps`` logged."""
    out: dict = {"steps": len(records)}
    step0 = next((r for r in records if r.get("step") == 0), None)
    if step0 is not None and step0.get("kl/rollout_vs_trainer") is not None:
        out["mismatch"] = float(step0["kl/rollout_vs_trainer"])
        if step0.get("kl/rollout_vs_trainer_max_abs") is not None:
            out["mismatch_max_abs"] = float(step0["kl/rollout_vs_trainer_max_abs"])
    else:
        m = _TOL_STOP.search(stderr or "")
        if m:
            out["mismatch"] = float(m.group(1))
    later = [r for r in records if r.get("step", 0) > 0] or records
    roll = [r["rollout/num_tokens"] / r["timing/generate"] for r in later
            if r.get("rollout/num_tokens") and r.get("timing/generate")]
    train = [r["perf/tokens_per_s"] * r["timing/step"] * ppo_epochs / r["timing/train"] for r in later
             if r.get("perf/tokens_per_s") and r.get("timing/step") and r.get("timing/train")]
    if roll:
        out["rollout_tok_s"] = statistics.median(roll)
    if train:
        out["trainer_tok_s"] = statistics.median(train)
    return out


def fill_mfu(result: Result, peak: float | None) -> None:
    """Set ``metrics["mfu"]`` from ``trainer_tok_s``, ``flops_per_token`` and ``trainable_models``."""
    m = result.metrics
    if m.get("trainer_tok_s") and m.get("flops_per_token"):
        v = acc.mfu(m["trainer_tok_s"] * m.get("trainable_models", 1), m["flops_per_token"], peak)
        if v is not None:
            m["mfu"] = v


def _fmt(v, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "mismatch":
        return f"{v:.3g}"
    if kind == "rate":
        return f"{v:,.0f}"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    return f"{v:.0f}"


COLUMNS = ("step", "status", "s", "step-0 mismatch", "rollout tok/s", "trainer tok/s", "MFU", "note")


def table_rows(results: list[Result]) -> list[list[str]]:
    """One row of strings per result, in ``COLUMNS`` order."""
    rows = []
    for r in results:
        m = r.metrics
        rows.append([r.name, r.status.upper(), _fmt(r.seconds, "s"), _fmt(m.get("mismatch"), "mismatch"),
                     _fmt(m.get("rollout_tok_s"), "rate"), _fmt(m.get("trainer_tok_s"), "rate"),
                     _fmt(m.get("mfu"), "pct"), r.reason.replace("\n", " ").replace("|", "/")])
    return rows


def render_text(results: list[Result], header: str = "") -> str:
    """The terminal table (fixed-width columns)."""
    rows = [list(COLUMNS)] + table_rows(results)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = [header] if header else []
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        if k == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 4)
    return "\n".join(lines).rstrip() + "\n"


def render_markdown(results: list[Result], header: str = "") -> str:
    """The same table as markdown (for ``benchmarks/RESULTS.md``)."""
    lines = [header, ""] if header else []
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join(" --- " for _ in COLUMNS) + "|")
    for row in table_rows(results):
        lines.append("| " + " | ".join(c if c else " " for c in row) + " |")
    return "\n".join(lines) + "\n"


def describe(facts: dict, peak: float | None) -> str:
    """One header line: GPUs, driver, torch, peak used for MFU."""
    smi, t = facts.get("smi", {}), facts.get("torch", {})
    gpus = smi.get("gpus") or []
    names = ", ".join(sorted({g["name"] for g in gpus})) or t.get("device_name") or "no GPU"
    return (f"gpu_check: {len(gpus) or t.get('device_count', 0)} x {names}; driver {smi.get('driver') or '-'} "
            f"(CUDA {smi.get('driver_cuda') or '-'}); torch {t.get('version', '-')} (CUDA {t.get('cuda') or 'none'}); "
            f"MFU peak {f'{peak:g} TFLOP/s bf16' if peak else 'unknown (--peak-tflops)'}")


def results_json(results: list[Result], facts: dict, peak: float | None, code: int) -> str:
    """``results.json``: format version, facts, MFU peak, exit code and every step's record."""
    return json.dumps({"version": 1, "facts": facts, "peak_tflops": peak, "exit_code": code,
                       "steps": [asdict(r) for r in results]}, indent=1, sort_keys=True) + "\n"


def load_results(path: str | Path) -> tuple[list[Result], dict, float | None]:
    """Results, facts and peak of a ``results.json`` (``UserError`` naming the file when malformed)."""
    try:
        data = json.loads(Path(path).read_text())
        results = [Result(**s) for s in data["steps"]]
        for r in results:
            if r.status not in STATUSES:
                raise ValueError(f"status {r.status!r}")
        return results, data.get("facts", {}), data.get("peak_tflops")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--from-results: {path} is not a gpu_check results.json ({e})") from None


# ---------------------------------------------------------------------------- the parent

def _python(args) -> str:
    if args.python:
        return args.python
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _probe_torch(python: str) -> dict:
    code = ("import json, torch\nfrom rlhf.engines import accelerator as a\nf = a.detect()\n"
            "print(json.dumps({'version': torch.__version__, 'cuda': f.torch_cuda, 'cuda_available': f.cuda_available,"
            " 'device_count': f.device_count, 'device_name': f.device_name, 'bf16': f.bf16_supported}))")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        p = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        return json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"error": p.stderr.strip()[-300:]}
    except (subprocess.TimeoutExpired, ValueError, IndexError, OSError) as e:
        return {"error": str(e)}


def gather_facts(python: str) -> dict:
    """nvidia-smi and the step interpreter's torch."""
    smi = {"gpus": [], "driver": "", "driver_cuda": None}
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            q = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
            h = subprocess.run([exe], capture_output=True, text=True, timeout=30)
            smi = parse_nvidia_smi(q.stdout if q.returncode == 0 else "", h.stdout)
        except (subprocess.TimeoutExpired, OSError):
            pass
    return {"smi": smi, "torch": _probe_torch(python), "python": python}


def _tail(text: str, n: int = 1) -> str:
    """The last ``n`` non-empty lines of a log (progress-bar redraws split off), at most 300 chars."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text or "") if ln.strip()]
    return " / ".join(lines[-n:])[-300:] if lines else ""


def error_line(stderr: str, prog: str = "rlhf train:") -> str:
    """The CLI's own error line (``rlhf train: ...``) from a command's stderr, else its last line."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", stderr or "") if ln.strip()]
    for ln in reversed(lines):
        i = ln.find(prog)
        if i >= 0:
            return ln[i:][:300]
    return _tail(stderr)


def run_step_subprocess(step: Step, args, python: str, workdir: Path, model: str | None, timeout: float,
                        env: dict) -> Result:
    """Run ``--run-step NAME`` in a subprocess with ``timeout``; its log goes to ``workdir/logs``."""
    res_file = workdir / "steps" / f"{step.name}.json"
    log_file = workdir / "logs" / f"{step.name}.log"
    res_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = [python, str(Path(__file__).resolve()), "--run-step", step.name, "--result", str(res_file),
           "--workdir", str(workdir), "--train-steps", str(args.train_steps)]
    if args.rollout_check_tol is not None:
        cmd += ["--rollout-check-tol", repr(args.rollout_check_tol)]
    if model:
        cmd += ["--model", model]
    t0 = time.monotonic()
    with open(log_file, "w") as log:
        # its own process group, so a timeout ends the step's Ray / vLLM / DeepSpeed children too
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(ROOT),
                             start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            _kill_group(p)
    seconds = time.monotonic() - t0
    log_text = log_file.read_text(errors="replace")
    if rc is None:
        return Result(step.name, "fail", f"timed out after {timeout:.0f} s (log: logs/{step.name}.log)", seconds)
    try:
        data = json.loads(res_file.read_text())
        r = Result(step.name, data["status"], data.get("reason", ""), seconds, data.get("metrics", {}))
    except (OSError, ValueError, KeyError):
        r = Result(step.name, "fail", f"exit {rc}: {_tail(log_text) or 'no output'}", seconds)
    if rc != 0 and r.status == "pass":
        r.status, r.reason = "fail", f"exit {rc} after reporting pass: {_tail(log_text)}"
    return r


def _kill_group(p: subprocess.Popen) -> None:
    """End what is left of a step's process group (children a finished step left behind too)."""
    import signal

    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _step_env(facts: dict) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"),
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RAY_ADDRESS", None)  # a single-machine check: each step starts its own local Ray
    src = (ROOT / "src" / "rlhf" / "workers" / "model_workers.py")
    if has_cuda(facts) and not env.get("DS_ACCELERATOR") and src.is_file() and needs_ds_env(src.read_text()):
        env["DS_ACCELERATOR"] = "cuda"  # the workers' own default is still cpu (docs/gpu_check.md)
    return env


def run_check(args) -> int:
    """The parent: facts, then every step in order (run or skipped), the table, the result files."""
    out = None
    if not args.dry_run:  # refuse a bad --out before any work
        from bairlhf.outputs import check_output

        out = check_output(args.out, COMMAND, inputs=[args.model] if args.model else [], force=args.force)
    python = _python(args)
    t_facts = time.monotonic()
    facts = gather_facts(python)
    facts_s = time.monotonic() - t_facts
    peak_name = (facts["torch"].get("device_name") or next((g["name"] for g in facts["smi"]["gpus"]), ""))
    peak = acc.peak_tflops(peak_name, args.peak_tflops)
    timeouts = dict(args.timeout)
    opts = {"dry_run": args.dry_run, "steps": set(args.steps) | {"env"}, "no_install": args.no_install,
            "megatron_present": (ROOT / "src" / "rlhf" / "engines" / "megatron" / "engine.py").is_file(),
            "model_given": args.model is not None}
    t_start = time.monotonic()
    results: list[Result] = []
    done: dict[str, Result] = {}
    model = args.model
    work = None
    if out is not None:
        work = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    env = _step_env(facts)
    for step in STEPS:
        left = args.budget - (time.monotonic() - t_start)
        if step.name == "env":
            t = facts["torch"]
            note = (f"torch {t.get('version', '?')}, CUDA build {t.get('cuda') or 'none'}, "
                    f"{t.get('device_count', 0)} visible device(s)" if "error" not in t else f"torch probe failed: {t['error']}")
            if cuda_too_new(t.get("cuda"), facts["smi"].get("driver_cuda")):
                note += f"; torch's CUDA {t['cuda']} is newer than the driver's {facts['smi']['driver_cuda']}"
            r = Result("env", "pass", note, facts_s)
        else:
            why = skip_reason(step, facts, opts, done, left)
            if why is not None:
                r = Result(step.name, "skip", why)
            else:
                timeout = min(timeouts.get(step.name, step.timeout_s), left)
                r = run_step_subprocess(step, args, python, work, model, timeout, env)
                if step.name == "install" and r.status != "skip":
                    facts["torch"] = _probe_torch(python)  # the steps after see what is there now
                if step.name == "model" and r.status == "pass":
                    model = r.metrics.pop("model_dir", None)
        fill_mfu(r, peak)
        results.append(r)
        done[r.name] = r
        print(f"[gpu_check] {r.name}: {r.status} {r.reason}".rstrip(), flush=True)
    code = exit_code(results, facts)
    header = describe(facts, peak)
    text = render_text(results, header)
    print("\n" + text, end="")
    if work is not None:
        from bairlhf.outputs import atomic_write, mark_output, replace_dir

        atomic_write(work / "results.json", results_json(results, facts, peak, code))
        atomic_write(work / "results.md", render_markdown(results, header))
        atomic_write(work / "results.txt", text)
        mark_output(work, COMMAND)
        replace_dir(work, out)
        print(f"[gpu_check] wrote {args.out}/results.json, results.md, logs/ (exit {code})")
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad usage is one stderr line and exit 2."""
    try:
        args = parse_args(argv)
        if args.run_step:
            return run_one_step(args)
        if args.from_results:
            results, facts, peak = load_results(args.from_results)
            print(render_text(results, describe(facts, peak)), end="")
            return exit_code(results, facts)
        return run_check(args)
    except UserError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return EXIT_USAGE


# ---------------------------------------------------------------------------- step bodies (GPU)

class StepSkip(Exception):
    """Raised by a step body: this step cannot run here (the message says why)."""


class StepFail(Exception):
    """Raised by a step body: a check failed (the message says which); ``metrics`` measured so far
    still reach the table (e.g. the step-0 mismatch of a run the tolerance check stopped)."""

    def __init__(self, message: str, metrics: dict | None = None):
        super().__init__(message)
        self.metrics = dict(metrics or {})


def run_one_step(args) -> int:
    """Child side: run one step body, write its result JSON, exit 0 (the parent reads the JSON)."""
    fn = globals()[f"step_{args.run_step}"]
    rec: dict = {"status": "pass", "reason": "", "metrics": {}}
    try:
        out = fn(args) or {}
        rec["reason"] = out.pop("note", "")
        rec["metrics"] = out
    except StepSkip as e:
        rec.update(status="skip", reason=str(e))
    except StepFail as e:
        rec.update(status="fail", reason=str(e), metrics=e.metrics)
    except Exception as e:  # anything else is a failure of the check, with its type
        import traceback

        traceback.print_exc()
        rec.update(status="fail", reason=f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
    Path(args.result).write_text(json.dumps(rec, default=float))
    return 0


SMOKE = os.environ.get("GPU_CHECK_SMOKE_CPU") == "1"
"""Developer aid only (never set by the check): run the step bodies on the CPU with tiny shapes, to
exercise their code paths (imports, engine APIs, result files) on a machine without a GPU."""


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise StepFail(what)


def _require_cuda():
    import torch

    _check(SMOKE or torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device")
    return torch


def install_commands(python: str, torch_pin: str, vllm_version: str, constraints: Path) -> list[list[str]]:
    """The pip commands of the install step: remove the CPU torch (an installed ``2.13.0+cpu``
    satisfies ``==2.13.0``, so a plain install would keep it), install the pinned torch from the
    registry (PyPI's Linux wheel is the CUDA build, with its ``nvidia-*`` libraries), then CUDA vLLM
    with the project's constraints (vLLM's transformers range replaces the project's), then this
    project again (editable, no dependency changes). Everything comes from the configured pip registry."""
    pip = [python, "-m", "pip", "install", "--no-input"]
    return [
        [python, "-m", "pip", "uninstall", "-y", "torch"],
        pip + ["-c", str(constraints), torch_pin],
        pip + ["-c", str(constraints), f"vllm=={vllm_version}"],
        pip + ["-c", str(constraints), "--no-deps", "-e", str(ROOT)],
    ]


def gpu_constraints(constraints_text: str, vllm_version: str) -> str:
    """``constraints.txt`` for the GPU path: the same pins, transformers left to vLLM (its
    ``<5.20`` range), plus the vLLM pin."""
    kept = [ln for ln in constraints_text.splitlines() if not ln.strip().startswith("transformers")]
    return "\n".join(kept + [f"vllm=={vllm_version}"]) + "\n"


def step_install(args) -> dict:
    """CUDA torch and CUDA vLLM into the interpreter running this step (the main .venv)."""
    import importlib.util

    import torch

    have_vllm = importlib.util.find_spec("vllm") is not None
    if torch.version.cuda and have_vllm:
        raise StepSkip(f"already installed: torch {torch.__version__} (CUDA {torch.version.cuda}), vllm")
    pin = next((ln.strip() for ln in (ROOT / "constraints.txt").read_text().splitlines()
                if ln.strip().startswith("torch==")), "torch")
    cons = Path(args.workdir) / "constraints-gpu.txt"
    cons.write_text(gpu_constraints((ROOT / "constraints.txt").read_text(), VLLM_VERSION))
    cmds = install_commands(sys.executable, pin, VLLM_VERSION, cons)
    if torch.version.cuda:
        cmds = cmds[2:]  # torch is already a CUDA build
    for cmd in cmds:
        print("[install]", " ".join(cmd), flush=True)
        p = subprocess.run(cmd)
        _check(p.returncode == 0, f"pip failed (exit {p.returncode}): {' '.join(cmd[3:])}")
    probe = subprocess.run([sys.executable, "-c", "import torch, vllm; print(torch.__version__, torch.version.cuda, "
                            "vllm.__version__, torch.cuda.is_available())"], capture_output=True, text=True)
    _check(probe.returncode == 0, f"after install: {_tail(probe.stderr)}")
    ver, cuda, vv, ok = probe.stdout.split()
    _check(cuda != "None", f"torch {ver} is still a CPU build (the registry served +cpu); install a CUDA torch by hand")
    _check(ok == "True", f"torch {ver} (CUDA {cuda}) sees no GPU: driver too old for CUDA {cuda}?")
    return {"note": f"torch {ver} (CUDA {cuda}), vllm {vv}"}


def step_model(args) -> dict:
    """Build or find the real-model fixture; ``model_dir`` goes to the later steps."""
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "real_model.py")], capture_output=True, text=True)
    sys.stdout.write(p.stdout)
    sys.stderr.write(p.stderr)
    _check(p.returncode == 0, f"real_model.py exit {p.returncode}: {_tail(p.stderr)}")
    d = p.stdout.strip().splitlines()[-1].strip()
    _check((Path(d) / "config.json").is_file(), f"real_model.py printed {d!r}, not a model directory")
    return {"model_dir": d, "note": d}


def _model_config(model: str) -> dict:
    return json.loads((Path(model) / "config.json").read_text())


def step_deepspeed(args) -> dict:
    """A few ZeRO-2 bf16 optimizer steps of the real model through the project's DeepSpeed engine."""
    torch = _require_cuda()
    want = "cpu" if SMOKE else "cuda"
    name = acc.ds_accelerator(torch.cuda.is_available(), os.environ)
    _check(name == want, f"DS_ACCELERATOR resolves to {name!r}, not {want}")
    os.environ["DS_ACCELERATOR"] = name
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoModelForCausalLM

    from rlhf.engines.deepspeed_engine import DeepSpeedTrainEngine, EngineSpec

    _check(get_accelerator().device_name() == want, f"DeepSpeed picked {get_accelerator().device_name()!r}")
    cfg = _model_config(args.model)
    B, S = (2, 32) if SMOKE else (8, 512)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    eng = DeepSpeedTrainEngine(model, EngineSpec(lr=1e-4, zero_stage=2, micro_batch_size=B, bf16=True))
    import torch.distributed as dist

    _check(dist.get_backend() == acc.dist_backend(want), f"process group backend {dist.get_backend()}, "
           f"not {acc.dist_backend(want)}")
    p0 = next(eng.module.parameters())
    _check(p0.device.type == want, f"parameters on {p0.device}, not {want}")
    _check(p0.dtype == torch.bfloat16, f"parameters are {p0.dtype}, not bf16")
    before = p0.detach().float().clone()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(cfg["vocab_size"]), (B, S), generator=g).to(p0.device)
    times, losses = [], []
    eng.train(True)
    for _ in range(4):
        _sync()
        t = time.perf_counter()
        loss = eng.module(input_ids=ids, labels=ids, use_cache=False).loss
        eng.backward(loss)
        eng.step()
        _sync()
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    _check(all(math.isfinite(x) for x in losses), f"non-finite loss {losses}")
    _check(losses[-1] < losses[0], f"loss did not fall on a repeated batch: {losses}")
    _check(not torch.equal(before, p0.detach().float()), "parameters did not change")
    eng.destroy()
    return {"trainer_tok_s": B * S / statistics.median(times[1:]), "flops_per_token": model_flops_per_token(cfg, S),
            "trainable_models": 1, "note": f"ZeRO-2 bf16, B={B} S={S}, loss {losses[0]:.3f} -> {losses[-1]:.3f}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompts(model: str, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    msgs = [[{"role": "user", "content": f"Write a short story about the number {i}."}] for i in range(n)]
    texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
    return [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]


def _vllm_check(args, nccl: bool) -> dict:
    torch = _require_cuda()
    import importlib.util

    if importlib.util.find_spec("vllm") is None and not SMOKE:
        raise StepSkip("vllm is not importable in this interpreter (install step)")
    import ray
    from transformers import AutoModelForCausalLM

    from rlhf.engines import vllm_weight_sync as ws
    from rlhf.engines.base import SamplingParams
    from rlhf.engines.vllm_engine import make_engine
    from rlhf.workers.group import init_ray

    n_gpu = torch.cuda.device_count()
    if nccl and n_gpu < 2:
        raise StepSkip("needs 2 GPUs: NCCL refuses two ranks on one GPU")
    # one GPU for the engine; the sender below picks its own (NCCL) or shares it
    init_ray(num_cpus=4, num_gpus=0 if SMOKE else 1)
    eng = make_engine(args.model, num_gpus=0.0 if SMOKE else 1.0, dtype="bfloat16", gpu_memory_utilization=0.3,
                      max_model_len=2048, python=None if SMOKE else sys.executable)
    try:
        prompts = _prompts(args.model, 4 if SMOKE else 64)
        params = SamplingParams(max_new_tokens=8 if SMOKE else 256, temperature=1.0, seed=0)
        eng.generate(prompts[:4], SamplingParams(max_new_tokens=8, seed=0))  # warm-up
        t = time.perf_counter()
        gens = eng.generate(prompts, params)
        dt = time.perf_counter() - t
        n_tok = sum(len(g.response_ids) for g in gens)
        _check(n_tok > 0 and all(len(g.logprobs) == len(g.response_ids) for g in gens), "empty generations or logprobs")
        _check(all(math.isfinite(x) and x <= 1e-6 for g in gens for x in g.logprobs), "non-finite or positive logprobs")
        hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
        named = {n: p.detach() for n, p in hf.named_parameters()}
        key = "model.norm.weight"

        def engine_value() -> torch.Tensor:
            return ray.get(eng.actors[0].state_dict.remote())[key].float()

        note = []
        if not nccl:
            named[key] = torch.full_like(named[key], 2.0)
            eng.update_weights(named.items())
            _check(bool((engine_value() == 2.0).all()), f"reload: vLLM's {key} is not the value sent")
            note.append("reload ok")
        backend = acc.weight_sync_backend(not SMOKE, shares_gpu=not nccl)
        # NCCL needs the sender on another GPU than the engine: the one with the most free memory
        # (vLLM has taken gpu_memory_utilization of its own); gloo on one GPU shares device 0
        if SMOKE:
            sender = torch.device("cpu")
        else:
            sender = torch.device("cuda", max(range(n_gpu), key=lambda i: torch.cuda.mem_get_info(i)[0]) if nccl else 0)
            torch.cuda.set_device(sender)
        port = _free_port()
        refs = eng.init_weight_sync("127.0.0.1", port, backend)
        group = ws.open_group("127.0.0.1", port, 0, eng.sync_world_size, backend, timeout_s=120)
        ray.get(refs)
        named[key] = torch.full_like(named[key], 3.0)
        specs = ws.weight_specs(named.items())
        recv = eng.receive_weights(specs)
        t = time.perf_counter()
        sent = ws.broadcast_weights(group, named.items(), sender)
        ray.get(recv)
        sync_s = time.perf_counter() - t
        _check(bool((engine_value() == 3.0).all()), f"broadcast ({backend}): vLLM's {key} is not the value sent")
        note.append(f"{backend} broadcast {sent / 2**20:.0f} MiB in {sync_s:.2f} s")
        after = eng.generate(prompts[:8], SamplingParams(max_new_tokens=16, seed=0))
        _check(all(len(g.response_ids) > 0 for g in after), "no tokens after the weight sync")
        out = {"note": "; ".join(note), "sync_s": sync_s}
        if not nccl:
            out["rollout_tok_s"] = n_tok / dt
            out["note"] = f"{len(prompts)} x <={params.max_new_tokens} tokens; " + out["note"]
        return out
    finally:
        eng.shutdown()
        ray.shutdown()


def step_vllm(args) -> dict:
    """vLLM on CUDA: generation throughput, in-process reload, broadcast sync on one GPU (gloo)."""
    return _vllm_check(args, nccl=False)


def step_vllm_nccl(args) -> dict:
    """The broadcast weight sync over NCCL (sender on GPU 1, the vLLM engine on GPU 0)."""
    return _vllm_check(args, nccl=True)


def step_megatron(args) -> dict:
    """megatron-core engine on CUDA at TP=1: a few bf16 updates of the real model."""
    torch = _require_cuda()
    import importlib.util

    if importlib.util.find_spec("megatron.core") is None:
        raise StepSkip("megatron-core is not installed")
    try:
        from rlhf.engines.megatron import MegatronEngine
    except ImportError as e:
        raise StepSkip(f"rlhf.engines.megatron not importable: {e}") from None
    from types import SimpleNamespace

    from rlhf.engines.base import Generation
    from rlhf.workers.batch import collate

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    cfg = _model_config(args.model)
    settings = SimpleNamespace(tensor_parallel=1, pipeline_parallel=1, distributed_optimizer=False,
                               recompute=False, bf16=True)
    B, P, T = (2, 8, 24) if SMOKE else (8, 64, 448)
    eng = MegatronEngine(args.model, "policy", settings, lr=1e-4, micro_batch_size=B)
    want = "cpu" if SMOKE else "cuda"
    _check(eng.device.type == want, f"megatron engine on {eng.device}, not {want}")
    g = torch.Generator().manual_seed(0)
    gens = [Generation(torch.randint(10, int(cfg["vocab_size"]), (P,), generator=g).tolist(),
                       torch.randint(10, int(cfg["vocab_size"]), (T,), generator=g).tolist(), [0.0] * T, True)
            for _ in range(B)]
    batch = collate(gens, pad_id=0)

    def loss_fn(out, sub):
        m = sub["mask"].to(out["logp"].device)
        loss = -(out["logp"] * m).sum() / m.sum()
        return loss, {"tokens": m.sum()}

    times, losses = [], []
    for _ in range(4):
        _sync()
        t = time.perf_counter()
        recs = eng.forward_backward(batch, loss_fn)
        eng.step()
        _sync()
        times.append(time.perf_counter() - t)
        losses.append(sum(r["loss"] for r in recs))
    _check(all(math.isfinite(x) for x in losses), f"non-finite loss {losses}")
    _check(losses[-1] < losses[0], f"NLL did not fall on a repeated batch: {losses}")
    eng.destroy()
    return {"trainer_tok_s": B * (P + T) / statistics.median(times[1:]),
            "flops_per_token": model_flops_per_token(cfg, P + T), "trainable_models": 1,
            "note": f"TP=1 bf16, B={B} S={P + T}, NLL {losses[0]:.3f} -> {losses[-1]:.3f}"}


def train_overrides(model: str, engine: str, run_dir: str, steps: int) -> list[str]:
    """``rlhf train`` arguments of the train steps: the tiny config pointed at the real model, bf16,
    one GPU shared by every role (colocated), a few steps, no checkpoints or probes."""
    return ["configs/ppo/tiny_cpu.yaml", f"model.actor={model}", "deepspeed.bf16=true", f"rollout.engine={engine}",
            "rollout.max_new_tokens=128", f"ppo.rollout_batch_size={TRAIN_BATCH}", f"ppo.mini_batch_size={TRAIN_BATCH}",
            "ppo.micro_batch_size=8", f"ppo.ppo_epochs={PPO_EPOCHS}", "optim.actor_lr=1e-6", "optim.critic_lr=1e-6",
            f"trainer.total_steps={steps}", "trainer.save_every=0", "trainer.probe_every=0",
            "cluster.gpus_per_worker=1", "cluster.cpus_per_worker=1", f"run_dir={run_dir}"]


def _train(args, engine: str) -> dict:
    _require_cuda()
    run_dir = Path(args.workdir) / f"run_{engine}"
    ov = train_overrides(args.model, engine, str(run_dir), args.train_steps)
    if args.rollout_check_tol is not None:
        ov.append(f"trainer.rollout_check_tol={args.rollout_check_tol}")
    if SMOKE:  # later overrides win
        ov += ["cluster.gpus_per_worker=0", "cluster.cpus_per_worker=0.25", "rollout.max_new_tokens=8",
               "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4", "ppo.micro_batch_size=4"]
    cmd = [sys.executable, "-m", "rlhf.cli", "train", *ov]
    print("[train]", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    sys.stdout.write(p.stdout)
    sys.stderr.write(p.stderr)
    records = read_jsonl(run_dir / "metrics.jsonl")
    m = train_metrics(records, p.stderr)
    cfg = _model_config(args.model)
    m.update(flops_per_token=model_flops_per_token(cfg, 128 + 64), trainable_models=2)
    if p.returncode != 0:
        # keep the numbers (the step-0 mismatch of a tolerance stop is the point of the row)
        raise StepFail(f"exit {p.returncode}: {error_line(p.stderr)}", m)
    _check(m["steps"] == args.train_steps, f"{m['steps']} of {args.train_steps} steps logged")
    m["note"] = f"{args.train_steps} steps; k3 max|dlogp| {m.get('mismatch_max_abs', float('nan')):.3g}"
    return m


def step_train_hf(args) -> dict:
    """``rlhf train`` on the real model in bf16 with transformers rollouts."""
    return _train(args, "hf")


def step_train_vllm(args) -> dict:
    """``rlhf train`` on the real model in bf16 with vLLM rollouts."""
    return _train(args, "vllm")


if __name__ == "__main__":
    sys.exit(main())
