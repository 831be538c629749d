"""The slot cache: ragged rows side by side, masks that hide unwritten and out-of-window keys, growth on demand."""

from __future__ import annotations

import pytest
import torch

import phds
from phds.engine.cache import SlotCache, attention_masks


def test_masks_hide_unwritten_positions_of_shorter_rows_and_keep_causality():
    config = phds.tiny_config("olmoe")
    config._attn_implementation = "sdpa"
    mask = attention_masks(config, torch.tensor([2, 4]), torch.tensor([3, 5]), 1, 5, torch.float32)
    assert mask.shape == (2, 1, 1, 5)
    assert mask[0, 0, 0].tolist() == [True, True, True, False, False]
    assert mask[1, 0, 0].tolist() == [True] * 5


def test_right_padded_prefill_rows_never_see_padding_and_eager_masks_are_additive():
    config = phds.tiny_config("olmoe")
    config._attn_implementation = "eager"
    mask = attention_masks(config, torch.tensor([0, 0]), torch.tensor([2, 3]), 3, 3, torch.float32)
    visible = mask == 0
    assert visible[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, False]]
    assert visible[1, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def test_sliding_layers_get_their_own_windowed_mask():
    config = phds.tiny_config("gpt_oss", sliding_window=2)
    config._attn_implementation = "eager"
    masks = attention_masks(config, torch.tensor([4]), torch.tensor([5]), 1, 5, torch.float32)
    assert set(masks) == {"sliding_attention", "full_attention"}
    assert (masks["sliding_attention"][0, 0, 0] == 0).tolist() == [False, False, False, True, True]
    assert (masks["full_attention"][0, 0, 0] == 0).tolist() == [True] * 5


@torch.inference_mode()  # as the engine runs it
def test_cache_grows_by_doubling_and_refuses_rows_beyond_max_len():
    cache = SlotCache(num_layers=1, num_rows=2, max_len=40, initial_len=8)
    cache.prepare(0, [0, 0], 3)
    keys, values = cache.update(torch.ones(2, 1, 3, 4), torch.ones(2, 1, 3, 4), 0)
    assert keys.shape == (2, 1, 3, 4) and cache.capacity == 8
    cache.prepare(0, [3, 9], 1)
    keys, _ = cache.update(torch.full((2, 1, 1, 4), 2.0), torch.full((2, 1, 1, 4), 2.0), 0)
    assert cache.capacity == 16 and keys.shape == (2, 1, 10, 4)
    assert keys[0, 0, 3, 0] == 2 and keys[1, 0, 9, 0] == 2 and keys[1, 0, 3, 0] == 0
    with pytest.raises(ValueError, match="max_len"):
        cache.prepare(0, [40], 1)
