"""`phds train` on the families of issue 18: Llama 4 (PHDS with ks above its k_pre of 1), PhiMoE, JetMoE, AFMoE."""

from __future__ import annotations

import json

import pytest
import transformers

import phds
from phds.training import train
from tests.training.conftest import ADDITION, fast_config


def _max_weight_change(model_a, model_b) -> float:
    b = model_b.state_dict()
    return max((value - b[name]).abs().max().item() for name, value in model_a.state_dict().items())


def test_llama4_trains_phds_at_ks_above_its_top_1(tmp_path):
    out = tmp_path / "llama4"
    result = train("tiny:llama4", fast_config(out, ks=[1, 2, 3], max_steps=3, eval_steps=3), train_data=ADDITION)
    assert result.method == "phds" and result.ks == [1, 2, 3] and set(result.k_history) <= {1, 2, 3}
    assert set(result.validation_loss) == {1, 2, 3}
    sidecar = phds.read_sidecar(out)
    assert sidecar.k_pre == 1 and sidecar.ks == [1, 2, 3] and sidecar.default_k == 1
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts_per_tok"] == 1 and "num_experts" not in config  # the alias TRL reads is not saved
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert _max_weight_change(loaded, phds.tiny_model("llama4")) > 1e-4  # it trained
    model, _ = phds.load(out, device="cpu", tokenizer=False)
    assert phds.get_k(model) == 1


@pytest.mark.slow
@pytest.mark.parametrize("family, ks", [("phimoe", [1, 2, 3]), ("jetmoe", [2, 4]), ("afmoe", [2, 4])])
def test_phds_trains_phimoe_jetmoe_and_afmoe(tmp_path, family, ks):
    out = tmp_path / family
    result = train(f"tiny:{family}", fast_config(out, ks=ks, max_steps=3, eval_steps=3), train_data=ADDITION)
    assert result.ks == ks and set(result.validation_loss) == set(ks)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert _max_weight_change(loaded, phds.tiny_model(family)) > 1e-4
    assert phds.read_sidecar(out).k_pre == phds.dial.k_pre(loaded)
