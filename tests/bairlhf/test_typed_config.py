"""typed_config.build: the one dataclass-from-YAML validator of the config sections."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from bairlhf.typed_config import build


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
