"""The dial: dialled models must equal models built at that k, for every family, every way k can be given."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import phds
from phds import dial
from tests.conftest import twin_at_k


def _logits(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids, **kwargs).logits


def _state(model):
    return (
        {name: tensor.clone() for name, tensor in model.state_dict().items()},
        phds.get_k(model),
        model.config.num_experts_per_tok,
        [layer.router.top_k for layer in phds.moe_layers(model)],
    )


def _assert_same_state(before, after):
    assert before[1:] == after[1:]
    for name, tensor in before[0].items():
        assert torch.equal(tensor, after[0][name]), name


# ----------------------------------------------------------------------------- discovery


def test_moe_layers_describe_each_family(arch):
    model = phds.tiny_model(arch)
    layers = phds.moe_layers(model)
    # JetMoE routes its attention and its MLP: two MoE layers per decoder layer, dialled together by index.
    assert [layer.index for layer in layers] == ([0, 0, 1, 1] if arch == "jetmoe" else [0, 1])
    k_pre = {"llama4": 1, "phimoe": 2}.get(arch, 4)  # Llama 4 and PhiMoE as released: top-1, sparsemixer top-2
    assert all(layer.num_experts == 8 and layer.k_pre == k_pre for layer in layers)
    assert dial.k_pre(model) == k_pre and phds.get_k(model) == k_pre
    expected_renorm = {
        "olmoe": False,
        "qwen2_moe": False,
        "qwen3_moe": True,
        "mixtral": True,
        "deepseek_v3": True,
        "gpt_oss": True,
        "llama4": False,  # sigmoid of each chosen logit
        "phimoe": False,  # each slot's softmax is its own
        "jetmoe": True,
        "afmoe": True,  # times route_scale
    }
    assert all(layer.renormalizes == expected_renorm[arch] for layer in layers)
    expected_shared = {"qwen2_moe": 1, "deepseek_v3": 1, "llama4": 1, "afmoe": 1}.get(arch, 0)
    assert all(len(layer.shared_experts) == expected_shared for layer in layers)


def test_dense_layers_are_not_moe_layers():
    model = phds.tiny_model("qwen2_moe", num_hidden_layers=3, mlp_only_layers=[1])
    assert [layer.index for layer in phds.moe_layers(model)] == [0, 2]
    with pytest.raises(ValueError, match=r"layers \[1\] that are not MoE layers"):
        phds.set_k(model, {1: 2})


def test_a_dense_model_is_rejected_with_a_clear_error():
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    dense = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="no MoE layers"):
        phds.set_k(dense, 2)
    with pytest.raises(phds.NotAnMoEError):
        phds.moe_layers(dense)


def test_an_moe_without_a_dialable_router_says_so():
    class _BlockWithoutRouter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = transformers.PretrainedConfig(num_experts_per_tok=2)
            self.gate = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="cannot be dialled"):
        phds.moe_layers(_BlockWithoutRouter())


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_global_k_matches_model_built_at_k(arch, k, input_ids):
    model = phds.tiny_model(arch)
    expected = _logits(twin_at_k(model, arch, k), input_ids)
    phds.set_k(model, k)
    # Bit for bit where transformers honours k; PhiMoE's k != 2 is the dial's rule against a direct computation.
    tolerance = 1e-6 if arch == "phimoe" and k != 2 else 0.0
    torch.testing.assert_close(_logits(model, input_ids), expected, rtol=tolerance, atol=tolerance)
    assert phds.get_k(model) == k
    assert model.config.num_experts_per_tok == k


def test_dialling_to_k_pre_changes_nothing(arch, input_ids):
    model = phds.tiny_model(arch)
    before = _logits(model, input_ids)
    phds.set_k(model, 3)
    phds.set_k(model, dial.k_pre(model))
    torch.testing.assert_close(_logits(model, input_ids), before, rtol=0, atol=0)


def test_per_row_k_with_equal_rows_matches_global_k(arch, input_ids):
    model = phds.tiny_model(arch)
    for k in (1, 3):
        with phds.sparsity(model, k):
            expected = _logits(model, input_ids)
        with phds.sparsity(model, torch.full((input_ids.shape[0],), k)):
            torch.testing.assert_close(_logits(model, input_ids), expected, rtol=1e-5, atol=1e-5)


def test_per_row_k_equals_running_each_row_at_its_own_k(arch, input_ids):
    model = phds.tiny_model(arch)
    ks = torch.tensor([1, 4, 2])
    with phds.sparsity(model, ks):
        mixed = _logits(model, input_ids)
    for row, k in enumerate(ks.tolist()):
        expected = _logits(twin_at_k(model, arch, k), input_ids[row : row + 1])
        torch.testing.assert_close(mixed[row : row + 1], expected, rtol=1e-5, atol=1e-5)


def test_per_token_k_with_constant_k_matches_global_k_and_single_tokens_match_their_k(arch, input_ids):
    model = phds.tiny_model(arch)
    for k in (1, 3):
        with phds.sparsity(model, torch.full_like(input_ids, k)):
            per_token = _logits(model, input_ids)
        with phds.sparsity(model, k):
            torch.testing.assert_close(per_token, _logits(model, input_ids), rtol=1e-5, atol=1e-5)
    single = input_ids[:, :1]
    ks_B1 = torch.tensor([[1], [4], [2]])
    with phds.sparsity(model, ks_B1):
        mixed_single = _logits(model, single)
    for row in range(single.shape[0]):
        with phds.sparsity(model, int(ks_B1[row, 0])):
            expected = _logits(model, single[row : row + 1])[0]
        torch.testing.assert_close(mixed_single[row], expected, rtol=1e-5, atol=1e-5)


def test_per_token_k_routes_each_token_with_its_own_k():
    """Router-level check of the defining property: each token's top-k weights equal the global-k weights."""
    model = phds.tiny_model("deepseek_v3")
    router = phds.moe_layers(model)[0].router
    hidden_TD = torch.randn(6, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    ks = torch.tensor([[1, 2, 3], [4, 2, 1]])
    with phds.sparsity(model, ks):
        _, mixed_weights, mixed_indices = router(hidden_TD)
    for token, k in enumerate(ks.reshape(-1).tolist()):
        with phds.sparsity(model, k):
            _, weights, indices = router(hidden_TD[token : token + 1])
        expected = dict(zip(indices[0].tolist(), weights[0].tolist(), strict=True))
        got = {
            i: w for i, w in zip(mixed_indices[token].tolist(), mixed_weights[token].tolist(), strict=True) if w != 0.0
        }
        assert got.keys() == expected.keys()
        for expert, weight in expected.items():
            assert got[expert] == pytest.approx(weight, rel=1e-5)


def test_per_layer_k_matches_a_per_layer_twin(input_ids):
    model = phds.tiny_model("olmoe")
    phds.set_k(model, {0: 1})
    assert phds.get_k(model) == {0: 1, 1: 4}
    layers = phds.moe_layers(model)
    assert [layer.router.top_k for layer in layers] == [1, 4]
    # Build the expectation by hand: layer 0 at k=1 and layer 1 at k=4 equals setting the routers directly.
    twin = twin_at_k(model, "olmoe", 4)
    phds.moe_layers(twin)[0].router.top_k = 1
    torch.testing.assert_close(_logits(model, input_ids), _logits(twin, input_ids), rtol=0, atol=0)


def test_epsilon_gives_dropped_experts_a_tiny_weight(input_ids):
    model = phds.tiny_model("olmoe")
    router = phds.moe_layers(model)[0].router
    hidden_TD = torch.randn(5, model.config.hidden_size)
    with phds.sparsity(model, 2, epsilon=1e-6):
        assert router.top_k == 4  # dropped experts are still computed
        _, weights, _ = router(hidden_TD)
        near = _logits(model, input_ids)
    assert (weights == 1e-6).sum(-1).tolist() == [2] * 5
    with phds.sparsity(model, 2):
        torch.testing.assert_close(near, _logits(model, input_ids), rtol=1e-4, atol=1e-4)


def test_renormalize_override_rescales_kept_weights_to_the_k_pre_mass():
    model = phds.tiny_model("olmoe")
    router = phds.moe_layers(model)[0].router
    hidden_TD = torch.randn(5, model.config.hidden_size)
    _, full_weights, _ = router(hidden_TD)
    with phds.sparsity(model, 2, renormalize=True):
        _, weights, _ = router(hidden_TD)
    torch.testing.assert_close(weights.sum(-1), full_weights.sum(-1))
    assert ((weights > 0).sum(-1) == 2).all()


def test_load_balancing_loss_uses_the_dialled_k(arch, input_ids):
    model = phds.tiny_model(arch)
    phds.set_k(model, 2)
    twin = twin_at_k(model, arch, 2)
    with torch.no_grad():
        dialled = model(input_ids, labels=input_ids, output_router_logits=True)
        built = twin(input_ids, labels=input_ids, output_router_logits=True)
    if built.aux_loss is None:
        pytest.skip(f"{arch} computes no load-balancing loss")
    torch.testing.assert_close(dialled.aux_loss, built.aux_loss)
    torch.testing.assert_close(dialled.loss, built.loss)


# ----------------------------------------------------------------------------- generate, cache, training, compile


def test_greedy_generate_at_dialled_k_equals_model_built_at_k(arch):
    model = phds.tiny_model(arch)
    prompt = torch.randint(4, 100, (2, 5), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    for k in (1, 2):
        expected = twin_at_k(model, arch, k).generate(prompt, **kwargs)
        with phds.sparsity(model, k):
            assert torch.equal(model.generate(prompt, **kwargs), expected)


def test_generate_with_per_row_k_equals_each_row_alone():
    model = phds.tiny_model("qwen3_moe")
    prompt = torch.randint(4, 100, (2, 5), generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with phds.sparsity(model, torch.tensor([1, 4])):
        mixed = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    for row, k in enumerate((1, 4)):
        with phds.sparsity(model, k):
            alone = model.generate(prompt[row : row + 1], attention_mask=torch.ones_like(prompt[:1]), **kwargs)
        assert torch.equal(mixed[row], alone[0])


def test_gradient_checkpointing_backward_matches_model_built_at_k(input_ids):
    model = phds.tiny_model("mixtral").train()
    twin = twin_at_k(model, "mixtral", 2).train()
    model.activation_checkpointing_enable()
    phds.set_k(model, 2)
    model(input_ids, labels=input_ids).loss.backward()
    twin(input_ids, labels=input_ids).loss.backward()
    for (name, param), twin_param in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(param.grad, twin_param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_per_row_k_backward_gives_finite_grads_and_no_grad_to_dropped_experts(input_ids):
    model = phds.tiny_model("olmoe").train()
    layers = phds.moe_layers(model)
    phds.set_k(model, torch.tensor([1, 2, 1]))
    routed = {}  # layer index -> (weights_TK, experts_TK) after the dial dropped slots
    hooks = [
        layer.router.register_forward_hook(lambda _, __, out, i=layer.index: routed.__setitem__(i, out[1:]))
        for layer in layers
    ]
    # A loss on every position: with next-token labels the last token's experts would get no gradient anyway.
    model(input_ids[:, :3]).logits.square().mean().backward()
    for hook in hooks:
        hook.remove()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    dropped_somewhere = False
    for layer in layers:
        weights_TK, experts_TK = routed[layer.index]
        kept = set(experts_TK[weights_TK != 0].tolist())
        dropped = set(experts_TK[weights_TK == 0].tolist()) - kept  # routed at k_pre, kept by no token
        dropped_somewhere |= bool(dropped)
        for name, param in layer.experts.named_parameters():
            for expert in range(layer.num_experts):
                has_grad = bool(param.grad[expert].abs().sum() > 0)
                assert has_grad == (expert in kept), f"layer {layer.index} {name} expert {expert}"
    assert dropped_somewhere, "no expert was dropped for every token: the check above proved nothing"


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_every_shipped_experts_implementation_honours_the_dial(implementation, input_ids):
    model = phds.tiny_model("qwen2_moe")
    reference = {k: _logits(twin_at_k(model, "qwen2_moe", k), input_ids) for k in (1, 2)}
    model.set_experts_implementation(implementation)
    for k in (1, 2):
        with phds.sparsity(model, k):
            torch.testing.assert_close(_logits(model, input_ids), reference[k], rtol=1e-5, atol=1e-5)
    with phds.sparsity(model, torch.tensor([1, 2, 1])):
        mixed = _logits(model, input_ids)
    torch.testing.assert_close(mixed[1], reference[2][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[2], reference[1][2], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_follows_the_dial(input_ids):
    model = phds.tiny_model("olmoe")
    reference = {k: _logits(twin_at_k(model, "olmoe", k), input_ids) for k in (1, 2)}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    for k in (1, 2, 1):
        with phds.sparsity(model, k):
            torch.testing.assert_close(_logits(compiled, input_ids), reference[k], rtol=1e-5, atol=1e-5)
    with phds.sparsity(model, torch.tensor([1, 2, 2])):
        mixed = _logits(compiled, input_ids)
    torch.testing.assert_close(mixed[0], reference[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], reference[2][1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- restore and bad input


def test_sparsity_restores_the_previous_k_also_when_the_body_raises(input_ids):
    model = phds.tiny_model("olmoe")
    phds.set_k(model, 3)
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"):
        with phds.sparsity(model, torch.tensor([1, 2, 1])):
            assert isinstance(phds.get_k(model), torch.Tensor)
            raise RuntimeError("boom")
    _assert_same_state(before, _state(model))
    with phds.sparsity(model, {0: 1}):
        pass
    _assert_same_state(before, _state(model))


@pytest.mark.parametrize(
    "bad_k, message",
    [
        (0, "between 1 and the number of experts"),
        (-1, "between 1 and the number of experts"),
        (9, "between 1 and the number of experts"),
        (2.5, "must be an integer"),
        ("2", "must be an integer"),
        (True, "must be an integer"),
        ({5: 2}, "not MoE layers"),
        ({0: 0}, "between 1 and the number of experts"),
        (torch.ones(2, 3, 4, dtype=torch.long), "shape"),
        (torch.ones(0, dtype=torch.long), "shape"),
        (torch.tensor([1.0, 2.0]), "integer"),
        (torch.tensor([1, 9]), "between 1 and the number of experts"),
    ],
)
def test_bad_k_raises_and_leaves_model_untouched(bad_k, message, input_ids):
    model = phds.tiny_model("olmoe")
    phds.set_k(model, 2)
    before = _state(model)
    logits = _logits(model, input_ids)
    with pytest.raises(ValueError, match=message):
        phds.set_k(model, bad_k)
    _assert_same_state(before, _state(model))
    torch.testing.assert_close(_logits(model, input_ids), logits, rtol=0, atol=0)


def test_per_row_k_for_the_wrong_batch_size_fails_at_forward(input_ids):
    model = phds.tiny_model("olmoe")
    with phds.sparsity(model, torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="per-row k has 2 rows"):
            _logits(model, input_ids)


def test_k_above_k_pre_is_allowed_and_warns_once(input_ids):
    model = phds.tiny_model("olmoe")
    with pytest.warns(UserWarning, match="above the pretrained k_pre=4"):
        phds.set_k(model, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        phds.set_k(model, 7)
    torch.testing.assert_close(
        _logits(model, input_ids), _logits(twin_at_k(model, "olmoe", 7), input_ids), rtol=0, atol=0
    )


def test_active_parameters_grow_with_k():
    model = phds.tiny_model("olmoe")
    counts = [dial.active_parameters(model, k) for k in range(1, 9)]
    assert counts == sorted(counts) and len(set(counts)) == 8
    per_expert = sum(p.numel() for p in phds.moe_layers(model)[0].experts.parameters()) // 8
    assert counts[1] - counts[0] == per_expert * len(phds.moe_layers(model))


def test_a_model_routing_to_every_expert_can_be_dialled(input_ids):
    model = phds.tiny_model("mixtral", num_local_experts=4, num_experts_per_tok=4)
    assert phds.moe_layers(model)[0].k_pre == 4
    phds.set_k(model, 2)
    expected = _logits(twin_at_k(model, "mixtral", 2, num_local_experts=4), input_ids)
    torch.testing.assert_close(_logits(model, input_ids), expected, rtol=0, atol=0)
