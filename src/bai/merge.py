"""``bai merge CONFIG.yaml --out DIR [--force]`` and the Python API ``bai.merge(config, out, force=False)``.

How a merge runs:

1. ``load_config`` validates the recipe; ``plan`` opens every input (headers only) and refuses,
   before any tensor is read: different architectures, different tensor names or shapes,
   pickled-only weights (unless ``allow_pickle``), malformed files (index, headers, config),
   an existing output without ``force`` or not written by ``bai merge``, an output that is,
   contains or lies inside an input. Tied embeddings follow transformers: an input without
   ``lm_head.weight`` whose config ties it contributes its input embedding; the output has an
   ``lm_head`` (and ``tie_word_embeddings: false``) only if some input stores one.
2. ``stream`` walks the output tensors in the reference checkpoint's on-disk order, reads each
   input's bytes chunk by chunk (element-wise methods: ``CHUNK_ELEMS`` elements; TIES, DARE and
   SLERP need whole tensors), upcasts to float32, combines (``bai.methods``), rounds once to the
   output dtype and appends the bytes to the open output shard(s). A sweep (``alphas``) computes
   stage 1 once per chunk and writes every alpha's shard from it. A non-finite input value stops
   the merge with the tensor and file named (checked on the data in the same pass, as a separate
   pre-pass would double the reads).
3. Everything is written under a temporary sibling ``.DIR.tmp-bai-PID`` (shards, index, config,
   generation config, tokenizer files, ``bai_merge.yaml``, the output marker of
   ``bairlhf.outputs``) and renamed to DIR when complete; with ``force`` the old DIR is moved
   aside only then, and deleted after the rename. Leftovers of killed runs are cleaned up (or an
   old output restored) by the next run on the same DIR.

Ownership: ``--force`` replaces DIR only when ``bai merge`` wrote it (the marker file
``.bai-rlhf-output.json``; outputs of versions before markers are recognised by their
``bai_merge.yaml``, see ``legacy_output``), and DIR may never be, contain or lie inside an input
checkpoint or the recipe file. Both are checked before any work.

Test hook: the environment variable ``BAI_MERGE_SLOWDOWN_S`` sleeps that many seconds after each
output tensor (used by the kill test to stop a merge mid-way).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import sys
import time
import types
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bai import __version__, methods
from bai.config import MergeConfig, MergeError, load_config
from bai.io import (INDEX_NAME, Checkpoint, Reader, ShardWriter, copy_aux_files, fingerprint,
                    open_checkpoint)
from bairlhf.errors import UserError
from bairlhf.outputs import check_output, dead_leftovers, mark_output, replace_dir

COMMAND = "bai merge"
"""The command name in the output marker (``bairlhf.outputs``)."""

CHUNK_ELEMS = 1 << 20
"""Elements per chunk (the unit of reading, writing and hand-over between the threads) for
element-wise methods; a multiple of ``BLOCK_ELEMS``."""
BLOCK_ELEMS = 1 << 18
"""Elements per compute block of an element-wise chunk (1 MiB of float32 per input: stays in the
core's cache). A multiple of every SIMD width, so the kernels split a chunk exactly as they split
one whole call over it and the bytes do not depend on it."""
HEAD = "lm_head.weight"
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight")
ELEMENTWISE = {"bai", "linear", "task_arithmetic"}
Combine = Callable[[list[Tensor], str], Iterable[Tensor]]


@dataclass
class OutTensor:
    """One tensor of the output checkpoint."""

    name: str
    """Its name in the output."""
    shape: tuple[int, ...]
    """Its shape (the same in every input)."""
    dtype: torch.dtype
    """Output dtype: the recipe's for floating tensors, the stored one otherwise (copied from the reference)."""
    sources: list[str]
    """Per input checkpoint, the name to read (the embedding, for a tied input's lm_head)."""
    floating: bool
    """False for integer/bool buffers, which are copied from the reference input."""

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclass
class Plan:
    """A validated merge, ready to stream."""

    cfg: MergeConfig
    """The recipe."""
    ckpts: list[Checkpoint]
    """Inputs in ``cfg.inputs()`` order (base first when there is one); the first is the reference."""
    roles: list[str]
    """Each input's recipe key, for messages and the record: ``base``, ``sft_models[0]``, ..."""
    shards: list[list[OutTensor]]
    """Output tensors grouped into shards of at most ``cfg.shard_size`` bytes."""
    out_config: dict
    """config.json of the output (the reference's, with dtype and tie_word_embeddings updated)."""
    in_bytes: int
    """Bytes read from the inputs (the progress bar's total)."""


def _embed_name(ck: Checkpoint) -> str | None:
    return next((n for n in ck.tensors if n.endswith(EMBED_SUFFIXES)), None)


def _tied(ck: Checkpoint) -> bool:
    text = ck.config.get("text_config")
    cfg = ck.config if "tie_word_embeddings" in ck.config or not isinstance(text, dict) else text
    return bool(cfg.get("tie_word_embeddings", True))   # PretrainedConfig's default


def _sources(ck: Checkpoint, want_head: bool) -> dict[str, str]:
    """Output name -> name to read in ``ck``, with a tied input's lm_head read from its embedding."""
    names = {n: n for n in ck.tensors}
    if want_head and HEAD not in names and _tied(ck) and _embed_name(ck):
        names[HEAD] = _embed_name(ck)
    return names


def _listing(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def plan(cfg: MergeConfig) -> Plan:
    """Open the inputs (headers only) and check they can be merged; raise ``MergeError`` otherwise."""
    roles = (["base"] if cfg.base is not None else []) + [
        f"{'sft_models' if cfg.method == 'bai' else 'models'}[{i}]" for i in range(len(cfg.models))]
    ckpts = [open_checkpoint(p, allow_pickle=cfg.allow_pickle, key=f"{r}.path") for r, p in zip(roles, cfg.inputs())]
    ref, ref_role = ckpts[0], roles[0]
    for ck, role in zip(ckpts[1:], roles[1:]):
        for key in ("architectures", "model_type"):
            if ck.config.get(key) != ref.config.get(key):
                raise MergeError(f"{role}: {ck.path / 'config.json'} has {key} {ck.config.get(key)!r}, but "
                                 f"{ref_role} ({ref.path}) has {ref.config.get(key)!r}")
    want_head = any(HEAD in ck.tensors for ck in ckpts)
    srcs = [_sources(ck, want_head) for ck in ckpts]
    for ck, role, s in zip(ckpts[1:], roles[1:], srcs[1:]):
        missing, extra = sorted(set(srcs[0]) - set(s)), sorted(set(s) - set(srcs[0]))
        if missing or extra:
            raise MergeError(f"{role}: tensor names differ from {ref_role} ({ref.path}): "
                             + "; ".join(f"{what}: {_listing(v)}" for what, v in
                                         (("missing", missing), ("extra", extra)) if v))
        bad = [f"{n} {list(ck.tensors[s[n]].shape)} vs {list(ref.tensors[srcs[0][n]].shape)}"
               for n in srcs[0] if ck.tensors[s[n]].shape != ref.tensors[srcs[0][n]].shape]
        if bad:
            raise MergeError(f"{role}: tensor shapes differ from {ref_role} ({ref.path}): {_listing(bad)}")

    out_dtype = getattr(torch, cfg.dtype)
    tensors = []
    for name, src in srcs[0].items():
        info = ref.tensors[src]
        floating = info.dtype.is_floating_point
        tensors.append(OutTensor(name, info.shape, out_dtype if floating else info.dtype,
                                 [s[name] for s in srcs], floating))
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        nbytes = t.numel * t.dtype.itemsize
        if shards[-1] and size + nbytes > cfg.shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    out_config = dict(ref.config)
    out_config["dtype"] = cfg.dtype
    if "torch_dtype" in out_config:
        out_config["torch_dtype"] = cfg.dtype
    if want_head and out_config.get("tie_word_embeddings", True):
        out_config["tie_word_embeddings"] = False
    in_bytes = sum(ck.tensors[src].nbytes for t in tensors for ck, src in zip(ckpts, t.sources))
    return Plan(cfg, ckpts, roles, shards, out_config, in_bytes)


def _combiner(cfg: MergeConfig) -> Combine:
    """The per-tensor merge for the recipe: inputs (float32, base first) -> one output per out dir."""
    w = [m.weight for m in cfg.models]
    lam, dens = cfg.lam, cfg.density

    def gens(name: str, n: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(zlib.crc32(f"{cfg.seed}:{i}:{name}".encode())) for i in range(n)]

    if cfg.method == "bai" and cfg.sweep:
        return lambda xs, name: methods.bai_sweep(xs[0], xs[1:], w, cfg.alphas)
    if cfg.method == "bai":     # one alpha: a single linear pass over [base, sft_1, ...]
        a = cfg.alphas[0]
        flat = [a] + [(1.0 - a) * wi for wi in w]
        return lambda xs, name: [methods.linear(xs, flat, out=xs[0])]
    table: dict[str, Combine] = {
        "linear": lambda xs, name: [methods.linear(xs, w, out=xs[0])],
        "task_arithmetic": lambda xs, name: [methods.task_arithmetic(xs[0], xs[1:], w, lam)],
        "ties": lambda xs, name: [methods.ties(xs[0], xs[1:], w, dens, lam)],
        "dare_linear": lambda xs, name: [methods.dare_linear(xs[0], xs[1:], w, dens, gens(name, len(w)), lam)],
        "dare_ties": lambda xs, name: [methods.dare_ties(xs[0], xs[1:], w, dens, gens(name, len(w)), lam)],
        "slerp": lambda xs, name: [methods.slerp(xs[0], xs[1], cfg.t)],
    }
    return table[cfg.method]


def _nonfinite_error(p: Plan, t: OutTensor, start: int, n: int) -> MergeError | None:
    """Look at the range in each input again and name the first holding a NaN or inf (None if none does)."""
    reader = Reader()
    try:
        for ck, src in zip(p.ckpts, t.sources):
            if not bool(torch.isfinite(reader.view(ck, src, start, n)).all()):
                where = ck.tensors[src].file if ck.tensors[src].offset >= 0 else ck.path
                return MergeError(f"tensor {src!r} in {where}: contains NaN or inf values")
    finally:
        reader.close()
    return None


def _chunks(p: Plan, elementwise: bool) -> list[tuple[int, OutTensor, int, int]]:
    """(shard index, tensor, first element, element count) of every chunk, in output order."""
    out = []
    for si, shard in enumerate(p.shards):
        for t in shard:
            step = CHUNK_ELEMS if elementwise else max(t.numel, 1)
            out += [(si, t, start, min(step, t.numel - start)) for start in range(0, t.numel, step)]
    return out


def stream(p: Plan, out_dirs: list[Path], *, progress: bool = True) -> None:
    """Write the weight shards and index of every output directory in one pass over the inputs.

    Three stages overlap: a reader thread maps the next chunk's input pages while the main thread
    computes the current one and a writer thread appends the previous results to the open shards
    (page-table population, torch kernels and file writes all release the GIL, or nearly so).
    Element-wise methods compute a chunk in blocks of ``BLOCK_ELEMS`` (upcast, combine, check,
    round into the chunk's output buffer), so the float32 working set stays in the core's cache.
    Progress goes through ``bairlhf.progress`` (a bar on a terminal, a line every few percent in a
    log). Compute uses one torch thread: the work is bandwidth-bound, and OpenMP teams on busy
    shared cores stall badly. Whole-tensor methods (TIES, DARE, SLERP) run without read-ahead to
    keep one tensor per input.
    """
    from concurrent.futures import ThreadPoolExecutor

    from bairlhf.progress import progress as progress_bar

    combine = _combiner(p.cfg)
    elementwise = p.cfg.method in ELEMENTWISE
    chunks = _chunks(p, elementwise)
    all_t = [t for s in p.shards for t in s]
    cap = max((n for *_, n in chunks), default=1)
    block = min(BLOCK_ELEMS, cap) if elementwise else cap
    out_size = max((t.dtype.itemsize for t in all_t), default=1)
    depth = 2 if elementwise else 1
    outb = [[torch.empty(cap * out_size, dtype=torch.uint8) for _ in out_dirs] for _ in range(depth)]
    f32 = [torch.empty(block, dtype=torch.float32) for _ in p.ckpts]
    names = [f"model-{i + 1:05d}-of-{len(p.shards):05d}.safetensors" for i in range(len(p.shards))]
    slow = float(os.environ.get("BAI_MERGE_SLOWDOWN_S", "0") or 0)
    reader = Reader()
    sink: dict = {"shard": -1, "writers": []}

    def advance(to: int) -> None:          # writer thread: close shards up to ``to``, open ``to``
        while sink["shard"] < to:
            for w in sink["writers"]:
                w.close()
            sink["shard"] += 1
            sink["writers"] = [] if sink["shard"] >= len(p.shards) else [
                ShardWriter(d / names[sink["shard"]], [(t.name, t.dtype, t.shape) for t in p.shards[sink["shard"]]])
                for d in out_dirs]

    def write(si: int, outs: list[Tensor]) -> None:
        advance(si)
        for w, o in zip(sink["writers"], outs):
            w.write(o)

    def read(j: int) -> list[Tensor]:
        _, t, start, n = chunks[j]
        for ck, src in zip(p.ckpts, t.sources):
            reader.prefetch(ck, src, start, n)
        return [reader.view(ck, src, start, n) for ck, src in zip(p.ckpts, t.sources)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    bar = progress_bar(total=p.in_bytes, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
               desc=f"bai merge ({p.cfg.method}, {len(out_dirs)} output{'s' * (len(out_dirs) > 1)})")
    try:
        with ThreadPoolExecutor(1) as rpool, ThreadPoolExecutor(1) as wpool:
            pending = [None] * depth
            nxt = rpool.submit(read, 0) if chunks else None
            for j, (si, t, start, n) in enumerate(chunks):
                views = nxt.result()
                if depth > 1 and j + 1 < len(chunks):
                    nxt = rpool.submit(read, j + 1)
                if pending[j % depth] is not None:
                    pending[j % depth].result()          # its output buffers are free again
                outs = [b[:n * t.dtype.itemsize].view(t.dtype) for b in outb[j % depth]]
                if not t.floating:
                    for o in outs:
                        o.copy_(views[0])
                for b in range(0, n, block) if t.floating else ():
                    m = min(block, n - b)
                    xs = [f[:m].copy_(v[b:b + m]) for f, v in zip(f32, views)]
                    if not elementwise:
                        xs = [x.view(t.shape) for x in xs]
                        if not all(bool(torch.isfinite(x.sum())) for x in xs):
                            raise _nonfinite_error(p, t, start, n) or MergeError(
                                f"tensor {t.name!r}: overflow while checking values")
                    for k, (o, y) in enumerate(zip(outs, combine(xs, t.name))):
                        if k == 0 and elementwise and not bool(torch.isfinite(y.sum())):
                            err = _nonfinite_error(p, t, start + b, m)
                            if err is not None:
                                raise err
                        o[b:b + m].copy_(y.reshape(-1))
                del views
                for ck, src in zip(p.ckpts, t.sources):
                    reader.release(ck, src, start, n)
                pending[j % depth] = wpool.submit(write, si, outs)
                if depth == 1 and j + 1 < len(chunks):
                    nxt = rpool.submit(read, j + 1)
                bar.update(sum(n * ck.tensors[src].dtype.itemsize for ck, src in zip(p.ckpts, t.sources)))
                if slow and start + n == t.numel:
                    time.sleep(slow)
            for f in pending:
                if f is not None:
                    f.result()
            wpool.submit(advance, len(p.shards)).result()
    finally:
        for w in sink["writers"]:
            w.abort()
        torch.set_num_threads(threads)
        bar.close()
        reader.close()
    total = sum(t.numel * t.dtype.itemsize for t in all_t)
    index = {"metadata": {"total_size": total, "bai_version": __version__},
             "weight_map": {t.name: fname for shard, fname in zip(p.shards, names) for t in shard}}
    for d in out_dirs:
        (d / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _write_metadata(p: Plan, out_dirs: list[Path]) -> None:
    """config.json, tokenizer and generation config, and a ``bai_merge.yaml`` in each output."""
    import yaml

    cfg = p.cfg
    inputs = [{"role": r, "path": str(ck.path), "fingerprint": fingerprint(ck)} for r, ck in zip(p.roles, p.ckpts)]
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    for i, d in enumerate(out_dirs):
        (d / "config.json").write_text(json.dumps(p.out_config, indent=2, sort_keys=True) + "\n")
        copied = copy_aux_files(p.ckpts[0].path, d)
        record = {"bai_version": __version__, "created_utc": now, "recipe": cfg.to_dict(), "inputs": inputs,
                  "copied_from_reference": copied, "output": {"dtype": cfg.dtype, "shards": len(p.shards)}}
        if cfg.method == "bai":
            a = cfg.alphas[i]
            record["output"].update(alpha=a, effective_weights=[a] + [(1 - a) * m.weight for m in cfg.models])
        (d / "bai_merge.yaml").write_text(yaml.safe_dump(record, sort_keys=False))


def legacy_output(path: Path) -> bool:
    """True for an output of ``bai merge`` written before marker files existed: a directory with a
    ``bai_merge.yaml`` (one merge), or one whose entries are all ``alpha_*`` directories that
    each have one (a sweep). ``--force`` may replace those as this command's own."""
    if (path / "bai_merge.yaml").is_file():
        return True
    kids = list(path.iterdir()) if path.is_dir() else []
    return bool(kids) and all(k.is_dir() and k.name.startswith("alpha_") and (k / "bai_merge.yaml").is_file()
                              for k in kids)


def _clean_leftovers(out: Path) -> None:
    """Remove temporary dirs of dead earlier runs on ``out``; restore an old output a killed
    ``--force`` run had moved aside but not yet replaced (names ``.DIR.tmp-bai-PID`` and
    ``.DIR.old-PID``, from ``bairlhf.outputs.replace_dir``, or ``.DIR.old-bai-PID`` of older versions)."""
    for kind, sib in dead_leftovers(out, ("tmp-bai", "old", "old-bai")):
        if kind != "tmp-bai" and not out.exists():
            os.rename(sib, out)
        else:
            shutil.rmtree(sib, ignore_errors=True)


def merge(config: "str | os.PathLike | dict | MergeConfig", out: "str | os.PathLike", force: bool = False, *,
          progress: bool = True) -> list[Path]:
    """Merge checkpoints as the recipe says and write the result(s) atomically under ``out``.

    ``config``: a YAML path, a dict of the YAML keys, or a ``MergeConfig``. ``force`` replaces an
    existing ``out`` only when an earlier ``bai merge`` wrote it (its marker file, or a
    ``bai_merge.yaml`` of older versions: ``legacy_output``), and only once the new output is
    complete. ``out`` may never be, contain or lie inside an input checkpoint or the recipe file.
    Returns the written checkpoint directories: ``[out]``, or ``[out/alpha_0.1, ...]`` for a
    sweep. Raises ``MergeError`` (or another ``UserError``) on bad input, before anything is written.
    """
    cfg = load_config(config)
    out = Path(os.path.expanduser(str(out))).resolve()
    recipe_file = [Path(config)] if isinstance(config, (str, os.PathLike)) else []
    _clean_leftovers(out)
    try:
        check_output(out, COMMAND, [*cfg.inputs(), *recipe_file], force, legacy=legacy_output)
    except MergeError:
        raise
    except UserError as e:
        raise MergeError(str(e)) from None
    p = plan(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-bai-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        dirs = cfg.out_dirs(tmp)
        for d in dirs:
            d.mkdir(parents=True)
        stream(p, dirs, progress=progress)
        _write_metadata(p, dirs)
        mark_output(tmp, COMMAND, method=cfg.method, **({"outputs": [d.name for d in dirs]} if cfg.sweep else {}))
        if (out.exists() or out.is_symlink()) and not force:
            raise MergeError(f"{out}: appeared during the merge; pass --force to replace it")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cfg.out_dirs(out)


class _CallableModule(types.ModuleType):
    """Makes ``bai.merge(config, out)`` work even once this submodule shadows the package attribute."""

    def __call__(self, config, out, force: bool = False, **kwargs) -> list[Path]:
        return merge(config, out, force, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
