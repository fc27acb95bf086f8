"""The merge recipe: a YAML file (or dict) validated into a typed ``MergeConfig`` before any work.

Every refusal is one ``MergeError`` whose message starts with the offending key, file or tensor.
Checks here need no checkpoint I/O beyond "does this path exist"; the checkpoint-level checks
(architectures, tensor names and shapes, pickled weights) live in ``bai.merge.plan``.

Each method's keys are one recipe dataclass (``RECIPES``) built by ``bairlhf.typed_config.build``:
unknown and missing keys, types, enums (``Literal``) and ranges (``Range``) are checked there;
``load_config`` then applies the rules across keys (alpha xor alphas, weights summing to 1, two
slerp models, no duplicate alphas, paths that exist) and returns a ``MergeConfig``.

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
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from bairlhf.errors import UserError
from bairlhf.typed_config import YAML_KEY, Range, build, coerce, yaml_keys

WEIGHT_TOLERANCE = 1e-6
Method = Literal["bai", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp"]
OutDtype = Literal["bfloat16", "float16", "float32"]
OUT_DTYPES = typing.get_args(OutDtype)
SUM_TO_ONE = {"bai", "linear"}          # methods whose weights form a convex combination
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}

# Value types, shared by the recipes (YAML) and ``MergeConfig`` (the validated result).
Weight = Annotated[float, Range(None, None)]
"""A model's weight: any finite number (bai / linear: >= 0 and summing to 1, checked across keys)."""
Alpha = Annotated[float, Range(0, 1)]
"""bai: the weight of M_base, in [0, 1]."""
T = Annotated[float, Range(0, 1)]
"""slerp: the interpolation position, in [0, 1]."""
Density = Annotated[float, Range(0, 1, lo_open=True)]
"""ties / dare: fraction of each task vector kept, in (0, 1]."""
Lambda = Annotated[float, Range(None, None)]
"""Scale of the merged task vector: any finite number."""
Seed = Annotated[int, Range(0, None)]
"""dare: seed of the drop masks, an integer >= 0."""


class MergeError(UserError):
    """Bad merge input; the message names the key, file or tensor at fault."""


# ----------------------------------------------------------------------------- recipes (YAML)

@dataclass
class WeightedModel:
    """One ``models`` / ``sft_models`` entry (a bare path string is read as ``{path: ...}``)."""

    path: str
    """Checkpoint directory."""
    weight: Weight
    """Its weight (any finite number)."""


@dataclass
class SlerpModel:
    """One slerp ``models`` entry (a bare path string is read as ``{path: ...}``)."""

    path: str
    """Checkpoint directory."""


@dataclass(kw_only=True)
class Recipe:
    """Keys every method accepts."""

    method: Method
    """The merge method (selects the recipe class, ``RECIPES``)."""
    dtype: OutDtype = "bfloat16"
    """Output dtype."""
    shard_size: int | str = 5 * 10**9
    """Bytes per output shard: an int or ``"5GB"``, ``"500MB"`` (``parse_size``)."""
    allow_pickle: bool = False
    """Accept checkpoints that only have pickled ``.bin`` weights."""


@dataclass(kw_only=True)
class BaiRecipe(Recipe):
    """``method: bai``: stage 1 ``sft_models`` (weights sum to 1), stage 2 with ``base``."""

    base: str
    """M_base (the pretrained model)."""
    sft_models: list[WeightedModel]
    """The SFT models and their stage-1 weights."""
    alpha: Alpha | None = None
    """One merge: the weight of M_base (give ``alpha`` or ``alphas``)."""
    alphas: list[Alpha] | None = None
    """A sweep: one output ``DIR/alpha_<a>`` per value, no two alike."""


@dataclass(kw_only=True)
class LinearRecipe(Recipe):
    """``method: linear``: a weighted average (weights sum to 1)."""

    models: list[WeightedModel]
    """The models and their weights."""


@dataclass(kw_only=True)
class TaskArithmeticRecipe(Recipe):
    """``method: task_arithmetic``: base + lambda x sum of weighted task vectors."""

    base: str
    """The task-vector origin."""
    models: list[WeightedModel]
    """The fine-tuned models and their weights."""
    lam: Lambda = field(default=1.0, metadata={YAML_KEY: "lambda"})
    """Scale of the merged task vector (YAML ``lambda``)."""


@dataclass(kw_only=True)
class TiesRecipe(TaskArithmeticRecipe):
    """``method: ties``: trim to ``density``, elect signs, disjoint mean."""

    density: Density
    """Fraction of each task vector kept."""


@dataclass(kw_only=True)
class DareRecipe(TiesRecipe):
    """``method: dare_linear`` / ``dare_ties``: random drop to ``density`` and rescale."""

    seed: Seed = 0
    """Seed of the drop masks."""


@dataclass(kw_only=True)
class SlerpRecipe(Recipe):
    """``method: slerp``: spherical interpolation of exactly two models."""

    models: list[SlerpModel]
    """The two models (t = 0 is the first)."""
    t: T
    """Interpolation position."""


RECIPES: dict[str, type[Recipe]] = {
    "bai": BaiRecipe, "linear": LinearRecipe, "task_arithmetic": TaskArithmeticRecipe, "ties": TiesRecipe,
    "dare_linear": DareRecipe, "dare_ties": DareRecipe, "slerp": SlerpRecipe,
}
"""Method -> the dataclass of its YAML keys."""


# ----------------------------------------------------------------------------- validated config


@dataclass
class ModelEntry:
    """One input checkpoint of a merge."""

    path: Path
    """Directory of a Hugging Face checkpoint (config.json plus safetensors weights)."""
    weight: Weight | None = None
    """Its weight, any finite number; for ``bai`` and ``linear`` each in [0, 1] and all summing to 1
    (within ``WEIGHT_TOLERANCE``). None only for slerp, whose mixing is given by ``t``."""


@dataclass
class MergeConfig:
    """A validated merge recipe. Build it with ``load_config``; fields mirror the YAML keys."""

    method: Method
    """One of ``RECIPES``: bai, linear, task_arithmetic, ties, dare_linear, dare_ties, slerp."""
    models: list[ModelEntry]
    """Inputs: for ``bai`` the stage-1 ``sft_models``; otherwise ``models`` (slerp: t=0 is the first)."""
    base: Path | None = None
    """M_base for bai (the pretrained model), the task-vector origin for task_arithmetic/ties/dare."""
    alphas: list[Alpha] = field(default_factory=list)
    """bai only: the weight(s) of M_base in stage 2 (the paper's alpha), each in [0, 1]; no two
    alike (YAML ``alpha: A`` or ``alphas: [A, ...]``)."""
    sweep: bool = False
    """True when the recipe gave ``alphas`` (a list): outputs go to ``DIR/alpha_<a>``."""
    t: T | None = None
    """slerp: interpolation position in [0, 1] (0 = first model)."""
    density: Density | None = None
    """ties / dare: fraction of each task vector kept, in (0, 1]."""
    lam: Lambda = 1.0
    """task_arithmetic / ties / dare: scale of the merged task vector, any finite number (YAML key
    ``lambda``)."""
    seed: Seed = 0
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
        keys = yaml_keys(RECIPES[self.method])
        d.update({k: v for k, v in (("lambda", self.lam), ("seed", self.seed)) if k in keys})
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


def _path(value: str, key: str) -> Path:
    if not value:
        raise MergeError(f"{key}: expected a checkpoint directory path, got {value!r}")
    p = Path(os.path.expanduser(value)).resolve()
    if not p.exists():
        raise MergeError(f"{key}: {p} does not exist")
    if not p.is_dir():
        raise MergeError(f"{key}: {p} is not a directory (give the checkpoint folder)")
    return p


def _entry(e: Any) -> Any:
    """A model entry with a bare path as ``{path: ...}`` and an ``os.PathLike`` path as a string."""
    if isinstance(e, (str, os.PathLike)):
        return {"path": os.fspath(e)}
    if isinstance(e, dict) and isinstance(e.get("path"), os.PathLike):
        return {**e, "path": os.fspath(e["path"])}
    return e


def _plain(raw: dict) -> dict:
    """The recipe as the recipe dataclasses read it (``_entry`` on each model, ``base`` a string)."""
    raw = dict(raw)
    if isinstance(raw.get("base"), os.PathLike):
        raw["base"] = os.fspath(raw["base"])
    for key in ("models", "sft_models"):
        if isinstance(raw.get(key), (list, tuple)):
            raw[key] = [_entry(e) for e in raw[key]]
    return raw


def _models(entries: list, key: str, method: str) -> list[ModelEntry]:
    if not entries:
        raise MergeError(f"{key}: expected a non-empty list of {{path, weight}}")
    out = [ModelEntry(path=_path(e.path, f"{key}[{i}].path"), weight=getattr(e, "weight", None))
           for i, e in enumerate(entries)]
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
    if "method" not in raw:
        raise MergeError(f"method: missing (one of {', '.join(RECIPES)})")
    method = coerce(Method, raw["method"], "method", MergeError)
    cls = RECIPES[method]
    note = "; slerp mixes with t" if method == "slerp" else ""
    r = build(cls, _plain(raw), "", MergeError,
              unknown=f"{{path}}: unknown key for method {method!r} (allowed: {{known}}){note}",
              missing=f"{{path}}: missing (method {method!r})")
    if isinstance(r, BaiRecipe) and (r.alpha is None) == (r.alphas is None):
        raise MergeError(f"alpha or alphas: {'missing' if r.alpha is None else 'give only one'} (method {method!r})")

    key = "sft_models" if method == "bai" else "models"
    cfg = MergeConfig(method=method, models=_models(getattr(r, key), key, method), dtype=r.dtype,
                      allow_pickle=r.allow_pickle, t=getattr(r, "t", None), density=getattr(r, "density", None),
                      lam=getattr(r, "lam", 1.0), seed=getattr(r, "seed", 0))
    if getattr(r, "base", None) is not None:
        cfg.base = _path(r.base, "base")
    if isinstance(r, BaiRecipe):
        if r.alphas is not None:
            if not r.alphas:
                raise MergeError(f"alphas: expected a non-empty list of numbers in [0, 1], got {r.alphas!r}")
            names = [alpha_dirname(a) for a in r.alphas]
            if len(set(names)) != len(names):
                raise MergeError(f"alphas: duplicate values {r.alphas!r}")
        cfg.alphas, cfg.sweep = ([r.alpha], False) if r.alpha is not None else (list(r.alphas), True)
    cfg.shard_size = parse_size(r.shard_size)
    return cfg
