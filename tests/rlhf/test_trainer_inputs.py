"""`rlhf train` input checks that need no Ray: the tokenizer of a run whose actor is a BAI merge."""

from __future__ import annotations

import yaml

from rlhf.config import load_config
from rlhf.trainer import check_inputs


def test_bai_recipe_actor_uses_the_recipes_tokenizer(tiny_family, tmp_path):
    """The merged actor does not exist before validation: its tokenizer is the recipe's reference
    input's (which the merge copies), never a freshly trained tiny one."""
    recipe = tmp_path / "bai.yaml"
    recipe.write_text(yaml.safe_dump({"method": "bai", "base": str(tiny_family["base"]), "alpha": 0.3,
                                      "sft_models": [{"path": str(tiny_family["sft_a"]), "weight": 0.5},
                                                     {"path": str(tiny_family["sft_b"]), "weight": 0.5}]}))
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"model.bai_recipe={recipe}"])
    tok = check_inputs(cfg, tmp_path / "run")
    assert tok.name_or_path == str(tiny_family["base"])
    assert not (tmp_path / "run").exists()
