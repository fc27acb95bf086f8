"""typed_config.build: the one dataclass-from-YAML validator of the config sections."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Literal

import pytest

from bairlhf.typed_config import YAML_KEY, Range, build, coerce, field_ranges, yaml_keys


@dataclass
class Inner:
    r: int = 4
    """rank"""
    targets: list[str] = field(default_factory=lambda: ["q"])
    """names"""


@dataclass
class Outer:
    name: str
    """required"""
    lr: float = 1e-3
    """a float"""
    limit: int | None = None
    """optional int"""
    pair: tuple[float, float] = (0.0, 1.0)
    """two numbers"""
    inner: Inner = field(default_factory=Inner)
    """nested section"""


class MyError(ValueError):
    pass


def test_builds_nested_and_coerces_floats():
    cfg = build(Outer, {"name": "x", "lr": "5e-5", "pair": [0, 2], "inner": {"r": 8, "targets": ["k", "v"]}})
    assert cfg == Outer(name="x", lr=5e-5, pair=(0.0, 2.0), inner=Inner(r=8, targets=["k", "v"]))
    assert isinstance(cfg.lr, float) and build(Outer, {"name": "x", "inner": None}).inner == Inner()
    assert build(Outer, {"name": "x", "limit": None}).limit is None


@pytest.mark.parametrize("data, message", [
    ({"name": "x", "inner": {"rank": 1}}, r"^cfg.inner.rank: unknown key \(known: r, targets\)$"),
    ({}, "^cfg.name: required$"),
    ({"name": "x", "limit": "3"}, r"^cfg.limit: expected int, got '3'$"),
    ({"name": "x", "inner": {"targets": ["q", 1]}}, r"^cfg.inner.targets\[1\]: expected str, got 1$"),
    ({"name": "x", "inner": [1]}, "^cfg.inner: expected a mapping, got list$"),
    ({"name": "x", "pair": [1]}, "^cfg.pair: expected a list of 2 numbers"),
])
def test_errors_name_the_dotted_key_with_the_callers_class(data, message):
    with pytest.raises(MyError, match=message):
        build(Outer, data, "cfg", MyError)


def test_message_wording_is_the_callers():
    with pytest.raises(ValueError, match=r"^sft: unknown key\(s\) \['a', 'b'\]$"):
        build(Outer, {"name": "x", "b": 1, "a": 2}, "sft", unknown="{where}: unknown key(s) {keys}")
    with pytest.raises(ValueError, match="^top: missing required key 'name'$"):
        build(Outer, {}, "top", missing="{where}: missing required key {key!r}")
    with pytest.raises(ValueError, match="^zz: unknown key"):  # top level: no leading dot
        build(Outer, {"zz": 1})


@dataclass
class Aliased:
    lam: float = field(default=1.0, metadata={YAML_KEY: "lambda"})
    """read from the YAML key ``lambda``"""
    need: int = field(default=0, metadata={YAML_KEY: "class"})
    """another keyword"""
    axes: dict[str, list[int]] = field(default_factory=dict)
    """typed mapping"""


def test_yaml_key_alias_names_the_yaml_key():
    assert build(Aliased, {"lambda": "0.5", "class": 3}) == Aliased(lam=0.5, need=3)
    assert yaml_keys(Aliased) == ["lambda", "class", "axes"]
    with pytest.raises(MyError, match=r"^a.lambda: expected float, got 'x'$"):
        build(Aliased, {"lambda": "x"}, "a", MyError)
    with pytest.raises(MyError, match=r"^a.lam: unknown key \(known: axes, class, lambda\)$"):
        build(Aliased, {"lam": 1.0}, "a", MyError)       # the field name is not a YAML key
    with pytest.raises(MyError, match="^a.class: required$"):
        build(dataclasses.make_dataclass("R", [("need", int, field(metadata={YAML_KEY: "class"}))]), {}, "a", MyError)


def test_typed_dict_checks_keys_and_values():
    assert build(Aliased, {"axes": {"x": [1, 2]}}).axes == {"x": [1, 2]}
    with pytest.raises(MyError, match=r"^axes.x: expected a list, got 3$"):
        build(Aliased, {"axes": {"x": 3}}, "", MyError)
    with pytest.raises(MyError, match=r"^axes.y\[1\]: expected int, got 'b'$"):
        build(Aliased, {"axes": {"y": [1, "b"]}}, "", MyError)
    with pytest.raises(MyError, match=r"^axes.5: expected str, got 5$"):
        build(Aliased, {"axes": {5: [1]}}, "", MyError)


def test_coerce_checks_one_value_as_build_does():
    Choice = Literal["a", "b"]
    assert coerce(Choice, "a", "k") == "a" and coerce(Choice | None, None, "k") is None
    assert coerce(Annotated[float, Range(0, 1)], "0.5", "k") == 0.5
    with pytest.raises(MyError, match="^k: must be one of 'a', 'b', got 'c'$"):
        coerce(Choice, "c", "k", MyError)
    with pytest.raises(MyError, match=r"^k: must be in \[0, 1\], got 2.0$"):
        coerce(Annotated[float, Range(0, 1)], 2, "k", MyError)


def test_field_ranges_use_the_yaml_key():
    @dataclass
    class R:
        lam: Annotated[float, Range(0, None)] = field(default=1.0, metadata={YAML_KEY: "lambda"})
        mode: Literal["x", "y"] = "x"

    assert field_ranges(R) == {"lambda": ">= 0", "mode": "x | y"}
