"""The merge recipe: a YAML file (or dict) validated into a typed ``MergeConfig`` before any work.

Every refusal is one ``MergeError`` whose message starts with the offending key, file or tensor.
Checks here need no checkpoint I/O beyond "does this path exist"; the checkpoint-level checks
(architectures, tensor names and shapes, pickled weights) live in ``bai.merge.plan``.

Methods and their keys (``dtype``, ``shard_size``, ``allow_pickle`` are accepted by all):

=================  =====================================================  ==========================
method             required                                               optional
=================  =====================================================  ==========================
bai                base, sft_models (weights sum to 1), alpha | alphas    (none)
linear             models (weights sum to 1)                              (none)
task_arithmetic    base, models                                           lambda
ties               base, models, density                                  lambda
dare_linear        base, models, density                                  lambda, seed
dare_ties          base, models, density                                  lambda, seed
slerp              models (exactly two, no weights), t                    (none)
=================  =====================================================  ==========================
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from bairlhf.errors import UserError
from bairlhf.typed_config import Range

WEIGHT_TOLERANCE = 1e-6
Method = Literal["bai", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp"]
OutDtype = Literal["bfloat16", "float16", "float32"]
OUT_DTYPES = typing.get_args(OutDtype)
COMMON_KEYS = {"method", "dtype", "shard_size", "allow_pickle"}
# method -> (required keys, optional keys); "alpha|alphas" means exactly one of the two
METHOD_KEYS: dict[str, tuple[set[str], set[str]]] = {
    "bai": ({"base", "sft_models", "alpha|alphas"}, set()),
    "linear": ({"models"}, set()),
    "task_arithmetic": ({"base", "models"}, {"lambda"}),
    "ties": ({"base", "models", "density"}, {"lambda"}),
    "dare_linear": ({"base", "models", "density"}, {"lambda", "seed"}),
    "dare_ties": ({"base", "models", "density"}, {"lambda", "seed"}),
    "slerp": ({"models", "t"}, set()),
}
SUM_TO_ONE = {"bai", "linear"}          # methods whose weights form a convex combination
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class MergeError(UserError):
    """Bad merge input; the message names the key, file or tensor at fault."""


@dataclass
class ModelEntry:
    """One input checkpoint of a merge."""

    path: Path
    """Directory of a Hugging Face checkpoint (config.json plus safetensors weights)."""
    weight: Annotated[float, Range(None, None)] | None = None
    """Its weight, any finite number; for ``bai`` and ``linear`` each in [0, 1] and all summing to 1
    (within ``WEIGHT_TOLERANCE``). None only for slerp, whose mixing is given by ``t``."""


@dataclass
class MergeConfig:
    """A validated merge recipe. Build it with ``load_config``; fields mirror the YAML keys."""

    method: Method
    """One of ``METHOD_KEYS``: bai, linear, task_arithmetic, ties, dare_linear, dare_ties, slerp."""
    models: list[ModelEntry]
    """Inputs: for ``bai`` the stage-1 ``sft_models``; otherwise ``models`` (slerp: t=0 is the first)."""
    base: Path | None = None
    """M_base for bai (the pretrained model), the task-vector origin for task_arithmetic/ties/dare."""
    alphas: list[Annotated[float, Range(0, 1)]] = field(default_factory=list)
    """bai only: the weight(s) of M_base in stage 2 (the paper's alpha), each in [0, 1]; no two
    alike (YAML ``alpha: A`` or ``alphas: [A, ...]``)."""
    sweep: bool = False
    """True when the recipe gave ``alphas`` (a list): outputs go to ``DIR/alpha_<a>``."""
    t: Annotated[float, Range(0, 1)] | None = None
    """slerp: interpolation position in [0, 1] (0 = first model)."""
    density: Annotated[float, Range(0, 1, lo_open=True)] | None = None
    """ties / dare: fraction of each task vector kept, in (0, 1]."""
    lam: Annotated[float, Range(None, None)] = 1.0
    """task_arithmetic / ties / dare: scale of the merged task vector, any finite number (YAML key
    ``lambda``)."""
    seed: Annotated[int, Range(0, None)] = 0
    """dare: seed of the random drop masks (one stream per tensor and model), an integer >= 0."""
    dtype: OutDtype = "bfloat16"
    """Output dtype: bfloat16, float16 or float32; arithmetic is always float32, rounded once at write."""
    shard_size: Annotated[int, Range(1, None)] = 5 * 10**9
    """Maximum bytes per output safetensors shard, >= 1 (YAML accepts ``"5GB"``, ``"500MB"``, ints)."""
    allow_pickle: bool = False
    """Accept checkpoints that only have pickled ``.bin`` weights (unsafe: unpickling runs code)."""

    def inputs(self) -> list[Path]:
        """Every input checkpoint, base first when there is one."""
        return ([self.base] if self.base is not None else []) + [m.path for m in self.models]

    def out_dirs(self, out: Path) -> list[Path]:
        """Where each output goes: ``out`` itself, or one ``out/alpha_<a>`` per alpha of a sweep."""
        return [out / alpha_dirname(a) for a in self.alphas] if self.sweep else [out]

    def to_dict(self) -> dict[str, Any]:
        """The recipe in YAML form, with absolute paths (what ``bai_merge.yaml`` records)."""
        d: dict[str, Any] = {"method": self.method}
        if self.base is not None:
            d["base"] = str(self.base)
        key = "sft_models" if self.method == "bai" else "models"
        d[key] = [{"path": str(m.path), **({"weight": m.weight} if m.weight is not None else {})}
                  for m in self.models]
        if self.method == "bai":
            d["alphas" if self.sweep else "alpha"] = list(self.alphas) if self.sweep else self.alphas[0]
        optional = {"t": self.t, "density": self.density}
        d.update({k: v for k, v in optional.items() if v is not None})
        req, opt = METHOD_KEYS[self.method]
        d.update({k: v for k, v in (("lambda", self.lam), ("seed", self.seed)) if k in req | opt})
        d.update(dtype=self.dtype, shard_size=self.shard_size, allow_pickle=self.allow_pickle)
        return d


def alpha_dirname(alpha: float) -> str:
    """Sweep output directory name for one alpha: 0.1 -> ``alpha_0.1``."""
    return f"alpha_{format(alpha, '.10g')}"


def parse_size(value: Any, key: str = "shard_size") -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"500MB"``, ``"40KiB"`` (decimal units, as transformers)."""
    if isinstance(value, bool):
        raise MergeError(f"{key}: expected a size like 5GB, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(value))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise MergeError(f"{key}: cannot read {value!r} as a size; use e.g. 5GB, 500MB, 40KB or an int")
        n = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if n <= 0:
        raise MergeError(f"{key}: must be positive, got {value!r}")
    return n


def _range(name: str) -> Range:
    """The valid range of ``MergeConfig.<name>`` (from its type: the one place ranges are written)."""
    tp = typing.get_type_hints(MergeConfig, include_extras=True)[name]
    todo = [tp]
    while todo:
        t = todo.pop()
        if typing.get_origin(t) is typing.Annotated:
            return next(m for m in t.__metadata__ if isinstance(m, Range))
        todo += typing.get_args(t)
    raise KeyError(name)


def _number(raw: dict, key: str, field_name: str) -> float:
    v, rng = raw[key], _range(field_name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise MergeError(f"{key}: expected a finite number, got {v!r}")
    if not rng.ok(v):
        raise MergeError(f"{key}: must be {'in ' if rng.lo is not None and rng.hi is not None else ''}{rng}, got {v!r}")
    return float(v)


def _path(value: Any, key: str) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise MergeError(f"{key}: expected a checkpoint directory path, got {value!r}")
    p = Path(os.path.expanduser(str(value))).resolve()
    if not p.exists():
        raise MergeError(f"{key}: {p} does not exist")
    if not p.is_dir():
        raise MergeError(f"{key}: {p} is not a directory (give the checkpoint folder)")
    return p


def _models(raw: dict, key: str, method: str) -> list[ModelEntry]:
    entries = raw[key]
    if not isinstance(entries, list) or not entries:
        raise MergeError(f"{key}: expected a non-empty list of {{path, weight}}")
    out = []
    for i, e in enumerate(entries):
        where = f"{key}[{i}]"
        if isinstance(e, (str, os.PathLike)):
            e = {"path": e}
        if not isinstance(e, dict):
            raise MergeError(f"{where}: expected {{path, weight}}, got {e!r}")
        allowed = {"path"} if method == "slerp" else {"path", "weight"}
        for k in e:
            if k not in allowed:
                raise MergeError(f"{where}.{k}: unknown key (allowed: {', '.join(sorted(allowed))})"
                                 + ("; slerp mixes with t" if k == "weight" else ""))
        if "path" not in e:
            raise MergeError(f"{where}.path: missing")
        weight = None
        if method != "slerp":
            if "weight" not in e:
                raise MergeError(f"{where}.weight: missing")
            weight = e["weight"]
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise MergeError(f"{where}.weight: expected a finite number, got {weight!r}")
            weight = float(weight)
        out.append(ModelEntry(path=_path(e["path"], f"{where}.path"), weight=weight))
    if method in SUM_TO_ONE:
        total = sum(m.weight for m in out)
        if abs(total - 1.0) > WEIGHT_TOLERANCE:
            raise MergeError(f"{key}: weights must sum to 1 (tolerance {WEIGHT_TOLERANCE:g}), they sum to {total!r}")
        if any(m.weight < 0 for m in out):
            raise MergeError(f"{key}: weights must be >= 0 for method {method!r}")
    if method == "slerp" and len(out) != 2:
        raise MergeError(f"{key}: slerp takes exactly two models, got {len(out)}")
    return out


def load_config(config: "str | os.PathLike | dict | MergeConfig") -> MergeConfig:
    """Validate a recipe (YAML path, dict, or an existing ``MergeConfig``) into a ``MergeConfig``.

    Relative paths are resolved against the current directory (as mergekit does). Raises
    ``MergeError`` naming the key on: unknown or missing keys, weights not summing to 1 (bai,
    linear), alpha / t outside [0, 1], density outside (0, 1], a missing path, a bad dtype.
    """
    if isinstance(config, MergeConfig):
        return dataclasses.replace(config)
    if isinstance(config, (str, os.PathLike)):
        from bairlhf.yamlio import load_mapping

        try:
            raw = load_mapping(config, "merge config")
        except MergeError:
            raise
        except UserError as e:          # YAML syntax (file:line:column), a missing file
            raise MergeError(str(e)) from None
    else:
        raw = config
    if not isinstance(raw, dict):
        raise MergeError(f"config: expected a mapping of keys, got {type(raw).__name__}")
    method = raw.get("method")
    if not isinstance(method, str) or method not in METHOD_KEYS:
        raise MergeError(f"method: {method!r} is not one of {', '.join(METHOD_KEYS)}")
    required, optional = METHOD_KEYS[method]
    allowed = COMMON_KEYS | optional | {k for r in required for k in r.split("|")}
    for k in raw:
        if k not in allowed:
            raise MergeError(f"{k}: unknown key for method {method!r} (allowed: {', '.join(sorted(allowed))})")
    for r in required:
        present = [k for k in r.split("|") if k in raw]
        if len(present) != 1:
            raise MergeError(f"{r.replace('|', ' or ')}: {'missing' if not present else 'give only one'}"
                             f" (method {method!r})")

    cfg = MergeConfig(method=method, models=_models(raw, "sft_models" if method == "bai" else "models", method))
    if "base" in raw:
        cfg.base = _path(raw["base"], "base")
    if "alpha" in raw:
        cfg.alphas = [_number(raw, "alpha", "alphas")]
    if "alphas" in raw:
        alphas = raw["alphas"]
        if not isinstance(alphas, list) or not alphas:
            raise MergeError(f"alphas: expected a non-empty list of numbers in {_range('alphas')}, got {alphas!r}")
        cfg.alphas = [_number({f"alphas[{i}]": a}, f"alphas[{i}]", "alphas") for i, a in enumerate(alphas)]
        names = [alpha_dirname(a) for a in cfg.alphas]
        if len(set(names)) != len(names):
            raise MergeError(f"alphas: duplicate values {alphas!r}")
        cfg.sweep = True
    if "t" in raw:
        cfg.t = _number(raw, "t", "t")
    if "density" in raw:
        cfg.density = _number(raw, "density", "density")
    if "lambda" in raw:
        cfg.lam = _number(raw, "lambda", "lam")
    if "seed" in raw:
        if isinstance(raw["seed"], bool) or not isinstance(raw["seed"], int) or not _range("seed").ok(raw["seed"]):
            raise MergeError(f"seed: expected an integer {_range('seed')}, got {raw['seed']!r}")
        cfg.seed = raw["seed"]
    if "dtype" in raw:
        if not isinstance(raw["dtype"], str) or raw["dtype"] not in OUT_DTYPES:
            raise MergeError(f"dtype: {raw['dtype']!r} is not one of {', '.join(OUT_DTYPES)}")
        cfg.dtype = raw["dtype"]
    if "shard_size" in raw:
        cfg.shard_size = parse_size(raw["shard_size"])
    if "allow_pickle" in raw:
        if not isinstance(raw["allow_pickle"], bool):
            raise MergeError(f"allow_pickle: expected true or false, got {raw['allow_pickle']!r}")
        cfg.allow_pickle = raw["allow_pickle"]
    return cfg
