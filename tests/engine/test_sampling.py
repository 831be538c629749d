"""Sampling parameters validate their fields; nucleus filtering and seeded sampling behave."""

from __future__ import annotations

import pytest
import torch

from phds.engine.sampling import SamplingParams, choose_tokens, filter_top_p, make_generator


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_new_tokens", 0),
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("seed", "x"),
        ("stop_token_ids", (-1,)),
    ],
)
def test_bad_sampling_params_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_top_p_keeps_the_smallest_nucleus_and_always_the_best_token():
    logits = torch.log(torch.tensor([0.1, 0.6, 0.3]))
    assert torch.isinf(filter_top_p(logits, 0.5)).tolist() == [True, False, True]
    assert torch.isinf(filter_top_p(logits, 0.8)).tolist() == [True, False, False]
    assert torch.isinf(filter_top_p(logits, 1e-6)).tolist() == [True, False, True]


def test_seeded_sampling_is_reproducible_and_greedy_is_argmax():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    sampled = SamplingParams(temperature=1.0, seed=7)
    draws = [
        choose_tokens(logits, [SamplingParams(), sampled], [None, make_generator(sampled, logits.device)])
        for _ in range(2)
    ]
    assert draws[0] == draws[1]
    assert draws[0][0] == int(logits[0].argmax())
