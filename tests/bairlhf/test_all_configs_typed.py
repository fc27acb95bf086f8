"""Every command's config is a dataclass tree built by ``bairlhf.typed_config.build``, with enums as ``Literal``.

For each command (``bai merge``, ``bai calibrate``, placement, ``rlhf sweep``, ``rlhf plan``, ``rlhf sft``,
``rlhf rm``, ``rlhf train``): no field that names a choice (method, dtype, engine, ...) is a plain ``str``,
every ``Literal`` default is one of its choices, and the loader reports a bad choice with the builder's
message naming the key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing

import pytest
import yaml

from bai.config import RECIPES, MergeConfig, MergeError
from bai.config import load_config as load_merge
from rlhf.calibrate.config import TABLE2_PRESETS, CalibrateConfig, CalibrateError, Preset
from rlhf.calibrate.config import load_config as load_calibrate
from rlhf.config import ConfigError, EngineChoice, PPOConfig
from rlhf.config import load_config as load_train
from rlhf.placement import PlacementError, PlacementSpec, RoleGroup, spec_from_dict
from rlhf.plan import GPUSpec, ModelSpec, PlanFile, PlanSettings, Workload, load_plan_input
from rlhf.rm import RMConfig, RMError, config_from_dict
from rlhf.sft import SFTConfig, SFTError
from rlhf.sft import load_config as load_sft
from rlhf.sweep import Sweep, SweepError, SweepFile, load_sweep

CONFIGS = {
    "merge": [*dict.fromkeys(RECIPES.values()), MergeConfig],
    "calibrate": [CalibrateConfig],
    "placement": [PlacementSpec],
    "sweep": [SweepFile, Sweep],
    "plan": [PlanFile, GPUSpec, ModelSpec, Workload, PlanSettings],
    "sft": [SFTConfig],
    "rm": [RMConfig],
    "train": [PPOConfig],
}
"""Command -> the dataclasses its YAML is built into (nested sections are walked)."""

CHOICE_NAME = re.compile(r"(^|_)(method|launcher|dtype|engine|mode|kind|precision|arch|device|statistic|"
                         r"weight_sync|preset|roles?|loggers|gpu|source)$|^on_")
"""Field names that hold a choice among fixed strings."""


def _strip(tp):
    """The annotation without ``Annotated``, ``| None`` and ``list[...]`` wrappers."""
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(inner) != 1:
                return tp
            tp = inner[0]
        elif typing.get_origin(tp) is list and typing.get_args(tp):
            tp = typing.get_args(tp)[0]
        else:
            return tp


def _fields(cls, where=""):
    """(dotted name, field, stripped annotation) of every field of a dataclass tree."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        tp = _strip(hints[f.name])
        yield key, f, tp
        if dataclasses.is_dataclass(tp):
            yield from _fields(tp, key)


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_configs_are_dataclasses_with_literal_enums(command):
    for cls in CONFIGS[command]:
        assert dataclasses.is_dataclass(cls), cls
        for key, f, tp in _fields(cls):
            if CHOICE_NAME.search(f.name):
                assert tp is not str, f"{command}: {cls.__name__}.{key} is a plain str; make it a Literal"
            if typing.get_origin(tp) is typing.Literal and f.default is not dataclasses.MISSING \
                    and f.default is not None:
                assert f.default in typing.get_args(tp), f"{cls.__name__}.{key}: default {f.default!r}"


def test_enum_fields_are_literals():
    """The enums the commands branch on are ``Literal`` types (not strings checked by hand)."""
    hints = {cls: typing.get_type_hints(cls) for cls in (RoleGroup, MergeConfig, SweepFile, Sweep, EngineChoice)}
    assert typing.get_origin(_strip(hints[RoleGroup]["roles"])) is typing.Literal
    for cls, name in [(MergeConfig, "method"), (MergeConfig, "dtype"), (SweepFile, "launcher"), (Sweep, "launcher"),
                      (EngineChoice, "actor"), (EngineChoice, "critic")]:
        assert typing.get_origin(_strip(hints[cls][name])) is typing.Literal, (cls, name)
    assert set(typing.get_args(Preset)) == set(TABLE2_PRESETS)


def _write(tmp_path, name, data) -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return str(p)


# command -> (call raising on a bad choice, its error class, the dotted key)
BAD_CHOICE = {
    "merge": (lambda d: load_merge({"method": "soup"}), MergeError, "method"),
    "merge-dtype": (lambda d: load_merge({"method": "linear", "models": [], "dtype": "int8"}), MergeError, "dtype"),
    "calibrate": (lambda d: load_calibrate({"search": {"method": "golden"}}), CalibrateError, "config.search.method"),
    "calibrate-preset": (lambda d: load_calibrate({"sft": {"preset": "nope"}}), CalibrateError, "config.sft.preset"),
    "placement": (lambda d: spec_from_dict({"groups": [{"roles": ["actor", "judge"], "gpus": 8}]}), PlacementError,
                  r"placement.groups\[0\].roles\[1\]"),
    "sweep": (lambda d: load_sweep(_write(d, "s.yaml", {"out": "o", "ppo_config": "p.yaml", "merge": {},
                                                        "launcher": "slurm"})), SweepError, "launcher"),
    "plan": (lambda d: load_plan_input(_write(d, "p.yaml", {"model": {"total_params_b": 1},
                                                            "workload": {"precision": "fp16"}})),
             PlacementError, "workload.precision"),
    "plan-train": (lambda d: load_plan_input(_write(d, "t.yaml", {"plan": {"gpu": "B300"}})), ConfigError,
                   "plan.gpu"),
    "sft": (lambda d: load_sft({"method": "qlora"}), SFTError, "sft.method"),
    "train": (lambda d: load_train(None, ["rollout.engine=sglang"]), ConfigError, "rollout.engine"),
    "train-engine": (lambda d: load_train(None, ["engine.critic=fsdp"]), ConfigError, "engine.critic"),
    "train-metrics": (lambda d: load_train(None, ["metrics.on_collapse=panic"]), ConfigError, "metrics.on_collapse"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHOICE))
def test_loaders_check_choices_with_the_builder(case, tmp_path):
    call, error, key = BAD_CHOICE[case]
    with pytest.raises(error, match=rf"^{key}: must be one of "):
        call(tmp_path)


def test_rm_loader_uses_the_builder():
    """``rlhf rm`` has no enum; its ranges come from the builder, before any path check."""
    with pytest.raises(RMError, match=r"^config.zero_stage: must be in \[0, 3\], got 4$"):
        config_from_dict({"model": "m", "data": "d", "out": "o", "zero_stage": 4})
    with pytest.raises(RMError, match=r"^config.seed: expected int, got 'x'$"):
        config_from_dict({"model": "m", "data": "d", "out": "o", "seed": "x"})
