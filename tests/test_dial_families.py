"""Routers are found by what they are: transformers MoE families beyond the six tested in depth dial exactly too,
and families built another way fail with a clear error."""

from __future__ import annotations

import pytest
import torch
import transformers

import phds

_SMALL = dict(
    hidden_size=32,
    intermediate_size=32,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    num_experts=8,
    num_local_experts=8,
    n_routed_experts=8,
    num_experts_per_tok=4,
    head_dim=8,
    shared_intermediate_size=32,
    shared_expert_intermediate_size=32,
    max_position_embeddings=128,
    first_k_dense_replace=0,
    n_group=1,
    topk_group=1,
    tie_word_embeddings=False,
)


def _tiny_from_defaults(model_type: str, **overrides):
    config = transformers.AutoConfig.for_model(model_type)
    for key, value in {**_SMALL, **overrides}.items():
        if hasattr(config, key):
            setattr(config, key, value)
    if getattr(config, "mlp_only_layers", None):
        config.mlp_only_layers = []
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", ["glm4_moe", "granitemoe", "hunyuan_v1_moe", "minimax", "cohere2_moe"])
def test_other_families_dial_exactly(model_type):
    model = _tiny_from_defaults(model_type)
    twin = _tiny_from_defaults(model_type, num_experts_per_tok=2)
    twin.load_state_dict(model.state_dict())
    input_ids = torch.randint(4, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = twin(input_ids).logits
        with phds.sparsity(model, 2):
            torch.testing.assert_close(model(input_ids).logits, expected, rtol=0, atol=0)
        with phds.sparsity(model, torch.tensor([2, 4])):
            mixed = model(input_ids).logits
    torch.testing.assert_close(mixed[0], expected[0], rtol=1e-5, atol=1e-5)


def test_a_family_whose_router_returns_another_layout_fails_clearly():
    model = _tiny_from_defaults("llama4_text")
    with pytest.raises(ValueError, match="Llama4Router .* cannot be dialled"):
        phds.set_k(model, 2)
