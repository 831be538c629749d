"""The recipes build valid configs for the paper's two settings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "function", "ks", "anchor"),
    [("olmoe", "olmoe_phds", [4, 5, 6, 7, 8], 4), ("qwen_moe", "qwen_moe_phds", [2, 3, 4], 2)],
)
def test_recipes_declare_the_papers_k_sets_and_their_oracles(tmp_path, name, function, ks, anchor):
    build = getattr(_load(name), function)
    config = build(str(tmp_path / "phds"))
    assert config.ks == ks and config.anchor_k == anchor and config.method == "phds"
    oracle = build(str(tmp_path / "oracle"), fixed_k=ks[0])
    assert oracle.method == "oracle" and oracle.ks is None and oracle.fixed_k == ks[0]
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps * 8 == 128
