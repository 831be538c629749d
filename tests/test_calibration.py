"""Calibration finds the policy threshold whose measured mean active experts hits a budget."""

from __future__ import annotations

import json
import random

import pytest
import torch

import phds
from phds.calibration import calibrate, measure_mean_active
from phds.calibration_data import calibration_batches
from phds.policies import Skip, TopP


def _texts(seed: int, n: int = 12) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefgh 0123456789+=") for _ in range(rng.randint(8, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    # a sharper router than random init, so thresholds spread tokens over several ks
    model = phds.tiny_model("qwen3_moe", num_experts_per_tok=6)
    with torch.no_grad():
        for layer in phds.moe_layers(model):
            layer.router.weight.mul_(8.0)
    return model


@pytest.mark.parametrize("policy", ["top_p", "skip"])
@pytest.mark.parametrize("target", [1.7, 2.5, 4.2])
def test_calibration_hits_its_target(model, policy, target):
    tokenizer = phds.tiny_tokenizer()
    phds.set_k(model, 5)
    result = calibrate(model, policy, target=target, data=_texts(0), tokenizer=tokenizer, progress=False)
    assert abs(result.measured - target) <= 0.05
    assert isinstance(result.policy, TopP if policy == "top_p" else Skip)
    assert phds.get_k(model) == 5  # calibration leaves the model as it found it
    # the measured mean is what the policy really does on that data, measured again from scratch
    batches = calibration_batches(tokenizer, _texts(0), max_length=256, batch_size=3, device="cpu")
    assert measure_mean_active(model, result.policy, batches) == pytest.approx(result.measured, abs=1e-6)
    phds.set_k(model, 6)


def test_calibration_reads_training_style_rows(model, tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"prompt": t[:5], "completion": t[5:]}) + "\n" for t in _texts(1)))
    result = calibrate(model, "top_p", target=2.0, data=str(path), tokenizer=phds.tiny_tokenizer(), progress=False)
    assert abs(result.measured - 2.0) <= 0.05


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(policy="top_k", target=2.0), "policy"),
        (dict(policy="top_p", target=0.5), "target"),
        (dict(policy="top_p", target=7.0), "target"),
    ],
)
def test_bad_calibration_requests_are_refused(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        calibrate(model, data=_texts(0), tokenizer=phds.tiny_tokenizer(), progress=False, **kwargs)
