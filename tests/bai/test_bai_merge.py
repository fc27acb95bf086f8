"""`bai merge` end to end on tiny real checkpoints: loadable output, correctness, refusals, atomicity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import bai
import bai.merge as merge_mod
from bai.cli import merge as merge_cli
from bai import cli as bai_cli
from bai import methods
from bai.config import MergeError
from rlhf import tiny

REPO = Path(__file__).resolve().parents[2]


def state(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a sharded checkpoint, as float32."""
    idx = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(idx["weight_map"].values())):
        out.update({k: v.float() for k, v in load_file(str(path / f)).items()})
    return out


def bai_recipe(fam, **kw):
    r = {"method": "bai", "base": str(fam["base"]), "alpha": 0.3, "dtype": "float32", "shard_size": "100KB",
         "sft_models": [{"path": str(fam["sft_a"]), "weight": 0.25}, {"path": str(fam["sft_b"]), "weight": 0.75}]}
    r.update(kw)
    return {k: v for k, v in r.items() if v is not None}


def close(got, want, dtype=torch.float32):
    rtol = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-5      # one bf16 ulp, or float32 summation order
    return torch.allclose(got, want, rtol=rtol, atol=1e-6)


@pytest.fixture(scope="module")
def sd(tiny_family):
    return {k: state(v) for k, v in tiny_family.items()}


def test_bai_merge_writes_a_loadable_checkpoint(tiny_family, sd, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    dirs = bai.merge(bai_recipe(tiny_family), out)
    assert dirs == [out]
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "bai_merge.yaml"):
        assert f in files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]      # no temporary left
    got = state(out)
    assert set(got) == set(sd["base"])
    for k, v in got.items():
        want = 0.3 * sd["base"][k] + 0.7 * (0.25 * sd["sft_a"][k] + 0.75 * sd["sft_b"][k])
        assert close(v, want), k
    rec = yaml.safe_load((out / "bai_merge.yaml").read_text())
    assert rec["recipe"]["alpha"] == 0.3 and rec["output"]["effective_weights"] == pytest.approx([0.3, 0.175, 0.525])
    assert [i["role"] for i in rec["inputs"]] == ["base", "sft_models[0]", "sft_models[1]"]
    assert all(i["fingerprint"].startswith("quick-sha256:") for i in rec["inputs"])
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.float32
    assert torch.equal(model.state_dict()["model.norm.weight"], got["model.norm.weight"])
    tok = AutoTokenizer.from_pretrained(str(out))
    assert "<think>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                 add_generation_prompt=True)


def test_sweep_cli_writes_every_alpha_in_one_pass(tiny_family, sd, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(merge_mod, "CHUNK_ELEMS", 1000)          # several chunks per tensor
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump(bai_recipe(tiny_family, alpha=None, alphas=[0.0, 0.4, 1.0], dtype="bfloat16")))
    assert merge_cli.main([str(cfg), "--out", str(tmp_path / "sweep"), "--no-progress"]) == 0
    assert "alpha_0.4" in capsys.readouterr().out
    for a in (0.0, 0.4, 1.0):
        got = state(tmp_path / "sweep" / f"alpha_{a:g}")
        for k, v in got.items():
            want = a * sd["base"][k] + (1 - a) * (0.25 * sd["sft_a"][k] + 0.75 * sd["sft_b"][k])
            assert close(v, want, torch.bfloat16), (a, k)
        assert yaml.safe_load((tmp_path / "sweep" / f"alpha_{a:g}" / "bai_merge.yaml").read_text())["output"]["alpha"] == a
    assert torch.equal(state(tmp_path / "sweep" / "alpha_1")["lm_head.weight"],
                       sd["base"]["lm_head.weight"].bfloat16().float())


def example(name: str, fam: dict) -> dict:
    """A configs/merge example with the demo's paths replaced by the test family's."""
    text = (REPO / "configs" / "merge" / name).read_text()
    for role, p in (("base", fam["base"]), ("instruct_sft", fam["sft_a"]), ("reasoning_sft", fam["sft_b"])):
        text = text.replace(f"runs/demo/models/{role}", str(p))
    return {**yaml.safe_load(text), "dtype": "float32"}


@pytest.mark.parametrize("name", ["linear.yaml", "task_arithmetic.yaml", "ties.yaml", "dare_linear.yaml",
                                  "dare_ties.yaml", "slerp.yaml"])
def test_every_method_through_the_engine(tiny_family, sd, tmp_path, name, monkeypatch):
    monkeypatch.setattr(merge_mod, "CHUNK_ELEMS", 1000)
    recipe = example(name, tiny_family)
    cfg = bai.load_config(recipe)
    got = state(bai.merge(recipe, tmp_path / "o", progress=False)[0])
    xs = [sd[r] for r in (["base"] if cfg.base else []) + ["sft_a", "sft_b"]]
    w = [m.weight for m in cfg.models]
    for k, v in got.items():
        ins = [x[k] for x in xs]
        gens = [torch.Generator().manual_seed(merge_mod.zlib.crc32(f"{cfg.seed}:{i}:{k}".encode())) for i in range(2)]
        want = {"linear.yaml": lambda: methods.linear(ins, w),
                "task_arithmetic.yaml": lambda: methods.task_arithmetic(ins[0], ins[1:], w, cfg.lam),
                "ties.yaml": lambda: methods.ties(ins[0], ins[1:], w, cfg.density, cfg.lam),
                "dare_linear.yaml": lambda: methods.dare_linear(ins[0], ins[1:], w, cfg.density, gens, cfg.lam),
                "dare_ties.yaml": lambda: methods.dare_ties(ins[0], ins[1:], w, cfg.density, gens, cfg.lam),
                "slerp.yaml": lambda: methods.slerp(ins[0], ins[1], cfg.t)}[name]()
        assert close(v, want), k


def test_example_configs_validate(tiny_family):
    names = sorted(p.name for p in (REPO / "configs" / "merge").glob("*.yaml"))
    assert {"bai.yaml", "bai_sweep.yaml"} <= set(names)
    sweep = bai.load_config(example("bai_sweep.yaml", tiny_family))
    assert sweep.alphas == pytest.approx([0.1 * i for i in range(1, 10)])
    for n in names:
        bai.load_config(example(n, tiny_family))


@pytest.fixture(scope="module")
def qwen_family(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("qwen_family")
    tied = tiny.make_tiny_model(root / "tied", arch="qwen2", tokenizer=tokenizer, tie_word_embeddings=True)
    return {"tied": tied, "tied_sft": tiny.perturbed_copy(tied, root / "tied_sft", seed=3),
            "untied": tiny.make_tiny_model(root / "untied", arch="qwen2", tokenizer=tokenizer, seed=4)}


def test_tied_embeddings(qwen_family, tmp_path):
    from transformers import AutoModelForCausalLM

    q = {k: state(v) for k, v in qwen_family.items()}
    assert "lm_head.weight" not in q["tied"] and "lm_head.weight" in q["untied"]
    linear = lambda a, b: {"method": "linear", "dtype": "float32", "models": [  # noqa: E731
        {"path": str(qwen_family[a]), "weight": 0.5}, {"path": str(qwen_family[b]), "weight": 0.5}]}
    both_tied = bai.merge(linear("tied", "tied_sft"), tmp_path / "tt", progress=False)[0]
    assert "lm_head.weight" not in state(both_tied)
    assert json.loads((both_tied / "config.json").read_text())["tie_word_embeddings"] is True
    # a tied input contributes its embedding to the lm_head of an untied one; the output is untied
    mixed = bai.merge(linear("tied", "untied"), tmp_path / "tu", progress=False)[0]
    want = 0.5 * q["tied"]["model.embed_tokens.weight"] + 0.5 * q["untied"]["lm_head.weight"]
    assert close(state(mixed)["lm_head.weight"], want)
    assert json.loads((mixed / "config.json").read_text())["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(str(mixed))
    assert close(model.lm_head.weight.detach(), want)


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory, tokenizer, tiny_family):
    root = tmp_path_factory.mktemp("odd")
    nan = root / "nan"
    shutil.copytree(tiny_family["sft_a"], nan)
    idx = json.loads((nan / "model.safetensors.index.json").read_text())
    shard = nan / idx["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    ts = load_file(str(shard))
    ts["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(ts, str(shard), metadata={"format": "pt"})
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_family["sft_b"] / "config.json", pickled)
    torch.save(state(tiny_family["sft_b"]), pickled / "pytorch_model.bin")
    return {"nan": nan, "pickled": pickled,
            "deeper": tiny.make_tiny_model(root / "deeper", tokenizer=tokenizer, num_layers=3),
            "wider": tiny.make_tiny_model(root / "wider", tokenizer=tokenizer, intermediate_size=96)}


@pytest.mark.parametrize("sft, extra, match", [
    ("deeper", {}, r"^sft_models\[1\]: tensor names differ from base .*extra: model.layers.2."),
    ("wider", {}, r"^sft_models\[1\]: tensor shapes differ from base .*mlp.down_proj.weight \[64, 96\] vs \[64, 128\]"),
    ("qwen", {}, r"^sft_models\[1\]: .*config.json has architectures \['Qwen2ForCausalLM'\], but base"),
    ("pickled", {}, r"^sft_models\[1\].path: .* has only pickled .bin weights \(pytorch_model.bin\)"),
    ("nan", {}, r"^tensor 'model.layers.1.mlp.up_proj.weight' in .*/nan/model-\d+-of-\d+.safetensors: contains NaN"),
])
def test_refusals_write_nothing(tiny_family, odd_models, tiny_qwen2_tied, tmp_path, sft, extra, match):
    other = tiny_qwen2_tied if sft == "qwen" else odd_models[sft]
    recipe = bai_recipe(tiny_family, sft_models=[{"path": str(tiny_family["sft_a"]), "weight": 0.5},
                                                 {"path": str(other), "weight": 0.5}], **extra)
    with pytest.raises(MergeError, match=match):
        bai.merge(recipe, tmp_path / "o", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_pickle_allowed_on_request(tiny_family, odd_models, tmp_path):
    recipe = bai_recipe(tiny_family, allow_pickle=True, sft_models=[
        {"path": str(tiny_family["sft_a"]), "weight": 0.25}, {"path": str(odd_models["pickled"]), "weight": 0.75}])
    got = state(bai.merge(recipe, tmp_path / "p", progress=False)[0])
    ref = state(bai.merge(bai_recipe(tiny_family), tmp_path / "s", progress=False)[0])
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def _recipe_file(tmp_path: Path, recipe: dict) -> Path:
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    return cfg


def test_existing_output_needs_force_and_ownership(tiny_family, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(MergeError, match=r"/o: already exists; pass --force"):
        bai.merge(bai_recipe(tiny_family), out, progress=False)
    cfg = _recipe_file(tmp_path, bai_recipe(tiny_family))
    assert bai_cli.main(["merge", str(cfg), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    # --force does not replace a directory bai merge did not write
    assert bai_cli.main(["merge", str(cfg), "--out", str(out), "--force", "--no-progress"]) == 2
    assert "was not written by `bai merge`" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("sweep", [False, True], ids=["merge", "sweep"])
def test_force_replaces_only_its_own_output(tiny_family, tmp_path, capsys, sweep):
    """--force onto an input, a directory holding an input, a foreign directory: exit 2, nothing
    changed; onto its own earlier output (or a pre-marker output with bai_merge.yaml): replaced."""
    import bairlhf.outputs as outputs

    work = tmp_path / "work"
    shutil.copytree(tiny_family["sft_b"], work / "models" / "sft_b")
    recipe = bai_recipe(tiny_family, sft_models=[{"path": str(tiny_family["sft_a"]), "weight": 0.5},
                                                 {"path": str(work / "models" / "sft_b"), "weight": 0.5}],
                        **({"alpha": None, "alphas": [0.2, 0.7]} if sweep else {}))
    cfg = _recipe_file(work, recipe)
    foreign = work / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    cases = {work / "models" / "sft_b": "is the input", work / "models": "contains the input",
             work: "contains the input", work / "models" / "sft_b" / "sub": "lies inside the input",
             foreign: "was not written by `bai merge`"}
    before = _tree(work)
    for out, expect in cases.items():
        capsys.readouterr()
        assert bai_cli.main(["merge", str(cfg), "--out", str(out), "--force", "--no-progress"]) == 2, out
        err = capsys.readouterr().err.strip()
        assert expect in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert _tree(work) == before, out
    out = tmp_path / "merged"
    assert bai_cli.main(["merge", str(cfg), "--out", str(out), "--no-progress"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("bai merge: wrote ") and str(out) in last
    assert outputs.owner(out) == "bai merge"
    (out / "stale.txt").write_text("from the earlier merge")
    assert bai_cli.main(["merge", str(cfg), "--out", str(out), "--force", "--no-progress"]) == 0
    assert not (out / "stale.txt").exists() and outputs.owner(out) == "bai merge"
    # an output written before markers existed (bai_merge.yaml only) counts as bai merge's own
    (out / outputs.MARKER).unlink()
    assert bai_cli.main(["merge", str(cfg), "--out", str(out), "--force", "--no-progress"]) == 0
    assert outputs.owner(out) == "bai merge"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "work"]      # no temporaries left


def test_single_file_input_and_float16_output(tiny_family, sd, tmp_path):
    single = tmp_path / "single"
    shutil.copytree(tiny_family["sft_b"], single, ignore=shutil.ignore_patterns("model*.safetensors*"))
    save_file({k: v.contiguous() for k, v in sd["sft_b"].items()}, str(single / "model.safetensors"),
              metadata={"format": "pt"})
    recipe = bai_recipe(tiny_family, dtype="float16", sft_models=[
        {"path": str(tiny_family["sft_a"]), "weight": 0.25}, {"path": str(single), "weight": 0.75}])
    out = bai.merge(recipe, tmp_path / "o", progress=False)[0]
    got = state(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    for k, v in got.items():
        want = 0.3 * sd["base"][k] + 0.7 * (0.25 * sd["sft_a"][k] + 0.75 * sd["sft_b"][k])
        assert torch.allclose(v, want.half().float(), rtol=2.0 ** -10, atol=1e-6), k


@pytest.mark.parametrize("method", ["bai", "ties"])
def test_bf16_inputs_float32_output(tiny_family, sd, tmp_path, method):
    ins = {}
    for role in ("base", "sft_a", "sft_b"):
        ins[role] = tmp_path / role
        shutil.copytree(tiny_family[role], ins[role], ignore=shutil.ignore_patterns("model*.safetensors*"))
        save_file({k: v.bfloat16() for k, v in sd[role].items()}, str(ins[role] / "model.safetensors"),
                  metadata={"format": "pt"})
    recipe = {"method": method, "base": str(ins["base"]), "dtype": "float32",
              "sft_models" if method == "bai" else "models": [{"path": str(ins["sft_a"]), "weight": 0.5},
                                                              {"path": str(ins["sft_b"]), "weight": 0.5}],
              **({"alpha": 0.3} if method == "bai" else {"density": 0.5})}
    got = state(bai.merge(recipe, tmp_path / "o", progress=False)[0])
    x = {r: {k: v.bfloat16().float() for k, v in sd[r].items()} for r in sd}
    for k, v in got.items():
        want = (methods.bai(x["base"][k], [x["sft_a"][k], x["sft_b"][k]], [0.5, 0.5], 0.3) if method == "bai"
                else methods.ties(x["base"][k], [x["sft_a"][k], x["sft_b"][k]], [0.5, 0.5], 0.5))
        assert v.dtype == torch.float32 and close(v, want), k


def test_compute_blocks_do_not_change_the_bytes(tiny_family, tmp_path, monkeypatch):
    """An element-wise chunk is computed in blocks (``BLOCK_ELEMS``, a multiple of every SIMD
    width): the shards are byte-identical to computing each chunk in one piece."""
    recipe = bai_recipe(tiny_family, alpha=None, alphas=[0.1, 0.7], dtype="bfloat16")
    monkeypatch.setattr(merge_mod, "CHUNK_ELEMS", 1024)
    shards = {}
    for block in (1024, 256):
        monkeypatch.setattr(merge_mod, "BLOCK_ELEMS", block)
        for d in bai.merge(recipe, tmp_path / str(block), progress=False):
            for f in sorted(d.glob("*.safetensors")):
                shards.setdefault((d.name, f.name), []).append(f.read_bytes())
    assert shards and all(a == b for a, b in shards.values())
