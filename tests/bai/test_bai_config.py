"""Recipe validation: one clear error naming the key, before any work."""

import pytest

from bai.config import MergeError, alpha_dirname, load_config, parse_size


@pytest.fixture()
def dirs(tmp_path):
    for n in ("base", "a", "b"):
        (tmp_path / n).mkdir()
    return tmp_path


def bai_recipe(d, **kw):
    r = {"method": "bai", "base": str(d / "base"),
         "sft_models": [{"path": str(d / "a"), "weight": 0.5}, {"path": str(d / "b"), "weight": 0.5}], "alpha": 0.5}
    r.update(kw)
    return {k: v for k, v in r.items() if v is not None}


def test_valid_bai_and_sweep(dirs):
    cfg = load_config(bai_recipe(dirs))
    assert cfg.alphas == [0.5] and not cfg.sweep and cfg.dtype == "bfloat16"
    assert cfg.inputs() == [dirs / "base", dirs / "a", dirs / "b"]
    cfg = load_config(bai_recipe(dirs, alpha=None, alphas=[0.1, 0.9]))
    assert cfg.sweep and [p.name for p in cfg.out_dirs(dirs / "o")] == ["alpha_0.1", "alpha_0.9"]
    assert load_config(cfg.to_dict()) == cfg          # the recorded recipe round-trips


def test_yaml_file(dirs):
    p = dirs / "r.yaml"
    p.write_text(f"method: linear\nmodels:\n  - {{path: {dirs / 'a'}, weight: 0.3}}\n"
                 f"  - {{path: {dirs / 'b'}, weight: 0.7}}\nshard_size: 40KB\n")
    cfg = load_config(p)
    assert cfg.method == "linear" and cfg.shard_size == 40_000


@pytest.mark.parametrize("change, match", [
    ({"alpah": 0.1}, r"^alpah: unknown key"),
    ({"density": 0.5}, r"^density: unknown key for method 'bai'"),
    ({"alpha": 1.5}, r"^alpha: must be in \[0, 1\], got 1.5"),
    ({"alpha": None, "alphas": [0.1, 2]}, r"^alphas\[1\]: must be in \[0, 1\], got 2"),
    ({"alpha": None}, r"^alpha or alphas: missing"),
    ({"alphas": [0.1]}, r"^alpha or alphas: give only one"),
    ({"method": "soup"}, r"^method: must be one of 'bai', .*got 'soup'"),
    ({"dtype": "int8"}, r"^dtype: must be one of 'bfloat16', 'float16', 'float32', got 'int8'"),
    ({"shard_size": "5 parsecs"}, r"^shard_size: cannot read"),
    ({"base": "/nonexistent/ckpt"}, r"^base: /nonexistent/ckpt does not exist"),
    ({"allow_pickle": "yes"}, r"^allow_pickle: expected bool, got 'yes'"),
])
def test_bad_recipes(dirs, change, match):
    with pytest.raises(MergeError, match=match):
        load_config(bai_recipe(dirs, **change))


def test_bad_model_lists(dirs):
    with pytest.raises(MergeError, match=r"^sft_models: weights must sum to 1 \(tolerance 1e-06\), they sum to 0.9"):
        load_config(bai_recipe(dirs, sft_models=[{"path": str(dirs / "a"), "weight": 0.4},
                                                 {"path": str(dirs / "b"), "weight": 0.5}]))
    load_config(bai_recipe(dirs, sft_models=[{"path": str(dirs / "a"), "weight": 0.5 + 5e-7},
                                             {"path": str(dirs / "b"), "weight": 0.5}]))   # within tolerance
    with pytest.raises(MergeError, match=r"^sft_models\[1\].path: .*/missing does not exist"):
        load_config(bai_recipe(dirs, sft_models=[{"path": str(dirs / "a"), "weight": 0.5},
                                                 {"path": str(dirs / "missing"), "weight": 0.5}]))
    with pytest.raises(MergeError, match=r"^sft_models\[0\].wieght: unknown key"):
        load_config(bai_recipe(dirs, sft_models=[{"path": str(dirs / "a"), "wieght": 1.0}]))
    with pytest.raises(MergeError, match=r"^models: slerp takes exactly two models"):
        load_config({"method": "slerp", "t": 0.5, "models": [str(dirs / "a")]})
    with pytest.raises(MergeError, match=r"^models\[0\].weight: unknown key .*slerp mixes with t"):
        load_config({"method": "slerp", "t": 0.5, "models": [{"path": str(dirs / "a"), "weight": 1}, str(dirs / "b")]})
    with pytest.raises(MergeError, match=r"^density: must be in \(0, 1\], got 0"):
        load_config({"method": "ties", "base": str(dirs / "base"), "density": 0,
                     "models": [{"path": str(dirs / "a"), "weight": 1.0}]})


def test_helpers():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("40KiB") == 40 * 1024 and parse_size(123) == 123
    assert alpha_dirname(0.1) == "alpha_0.1" and alpha_dirname(0.30000000000000004) == "alpha_0.3"


def numeric_fields(cls, where: str = "") -> list[str]:
    """Dotted keys of every int/float field (or list of them) of a config dataclass tree."""
    import dataclasses
    import typing

    out = []
    for name, tp in typing.get_type_hints(cls, include_extras=True).items():
        key = f"{where}.{name}" if where else name
        todo, seen = [tp], []
        while todo:
            t = todo.pop()
            if typing.get_origin(t) is typing.Annotated:
                t = typing.get_args(t)[0]
            if t in (int, float):
                seen.append(t)
            elif dataclasses.is_dataclass(t):
                out += numeric_fields(t, key)
            else:
                todo += [a for a in typing.get_args(t) if a is not type(None)]
        if seen:
            out.append(key)
    return out


def test_every_numeric_field_has_a_documented_range():
    from bairlhf.typed_config import field_ranges

    from bai.config import MergeConfig

    ranges = field_ranges(MergeConfig)
    keys = numeric_fields(MergeConfig)
    assert {"alphas", "t", "density", "lam", "seed", "shard_size", "models.weight"} <= set(keys)
    assert [k for k in keys if k not in ranges] == []
    assert ranges["alphas"] == "[0, 1]" and ranges["density"] == "(0, 1]"
