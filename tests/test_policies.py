"""Routing policies give exactly the routing their rule defines, on every family, computed here from the router."""

from __future__ import annotations

import pytest
import torch

import phds
from phds import dial
from phds.policies import Skip, TopP, parse_policy
from tests.conftest import FAMILY_PARAMS

INPUT_IDS = torch.randint(4, 100, (2, 7), generator=torch.Generator().manual_seed(3))


def _expected_count(probs: list[float], weights: list[float], policy) -> int:
    """The policy's rule, token by token, from the router's ranked probabilities and weights."""
    if isinstance(policy, TopP):
        total = 0.0
        for count, p in enumerate(probs, start=1):
            total += p
            if total >= policy.tau:
                return count
        return len(probs)
    count = 1
    for w in weights[1:]:
        if w < policy.beta * weights[0]:
            break
        count += 1
    return count


def _router_forward_raw(router, args):
    """The router's own output at its current top_k, without the dial's hook."""
    return type(router).forward(router, *args)


def _routing(router, output):
    """(logits (T, E), weights (T, K), indices (T, K)) of a router output, whatever the family's layout."""
    return dial._read_routing(router._phds_layout, output, router.top_k)


def _routing_under(model, policy):
    """Per layer: (hidden states in, weights the experts got) during one forward under `policy`."""
    seen = {}
    handles = []
    for layer in phds.moe_layers(model):
        router = layer.router

        def capture(module, args, output, index=layer.name):
            _, weights, indices = _routing(module, output)
            seen[index] = (tuple(a.detach() for a in args), weights.detach(), indices.detach())

        handles.append(router.register_forward_hook(capture))  # after the dial's hook: sees its result
    try:
        with torch.no_grad(), phds.sparsity(model, policy):
            model(INPUT_IDS)
            active = phds.active_experts(model)
    finally:
        for handle in handles:
            handle.remove()
    return seen, active


@pytest.mark.parametrize("family", FAMILY_PARAMS)
@pytest.mark.parametrize("policy", [TopP(0.3), TopP(0.55), Skip(0.5), Skip(0.8)], ids=str)
def test_policy_keeps_what_its_rule_defines(family, policy):
    model = phds.tiny_model(family, num_experts_per_tok=4)
    seen, active = _routing_under(model, policy)
    means = {}
    for layer in phds.moe_layers(model):
        args, got_weights, got_indices = seen[layer.name]
        router = layer.router
        with torch.no_grad():
            logits, weights, indices = _routing(router, _router_forward_raw(router, args))
        logits, weights = logits.float(), weights.float()
        got_indices = got_indices.reshape(indices.shape)
        listed = got_indices >= 0  # JetMoE's listing holds only the kept slots; the weights below check the rest
        assert torch.equal(indices[listed], got_indices[listed])
        probs_all = logits.softmax(-1)
        # bias-corrected choice: DeepSeek-V3's own bias, or the one AFMoE's block hands its router
        bias = getattr(router, "e_score_correction_bias", None)
        bias = args[1] if bias is None and len(args) > 1 else bias
        choice_score = logits.sigmoid() + bias.float() if bias is not None else logits
        counts = []
        expected = torch.zeros_like(weights)
        for t in range(indices.shape[0]):
            order = sorted(range(indices.shape[1]), key=lambda j: -float(choice_score[t, indices[t, j]]))
            ranked_probs = [float(probs_all[t, indices[t, j]]) for j in order]
            ranked_weights = [float(weights[t, j]) for j in order]
            count = _expected_count(ranked_probs, ranked_weights, policy)
            counts.append(count)
            kept = order[:count]
            for j in kept:
                expected[t, j] = weights[t, j]
            if layer.renormalizes:
                expected[t] *= weights[t].sum() / expected[t].sum()
        got = got_weights.reshape(weights.shape).float()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        means.setdefault(layer.index, []).append(sum(counts) / len(counts))
        assert 1 <= min(counts) and max(counts) <= layer.k_pre
    for index, layer_means in means.items():  # JetMoE: a decoder layer's attention and MLP routers, averaged
        assert active[index] == pytest.approx(sum(layer_means) / len(layer_means))


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_policy_extremes_equal_fixed_k(family):
    model = phds.tiny_model(family, num_experts_per_tok=4)
    with torch.no_grad():
        at_k_pre = model(INPUT_IDS).logits
        with phds.sparsity(model, 1):
            at_one = model(INPUT_IDS).logits
        with phds.sparsity(model, TopP(1.0)):
            torch.testing.assert_close(model(INPUT_IDS).logits, at_k_pre, rtol=1e-5, atol=1e-5)
        with phds.sparsity(model, Skip(0.0)):
            torch.testing.assert_close(model(INPUT_IDS).logits, at_k_pre, rtol=1e-5, atol=1e-5)
        with phds.sparsity(model, TopP(1e-6)):
            torch.testing.assert_close(model(INPUT_IDS).logits, at_one, rtol=1e-5, atol=1e-5)
            assert set(phds.active_experts(model).values()) == {1.0}


def test_active_experts_excludes_padding_and_resets_on_a_new_setting():
    model = phds.tiny_model("olmoe", num_experts_per_tok=4)
    mask = torch.ones_like(INPUT_IDS)
    mask[1, :4] = 0
    with torch.no_grad():
        phds.set_k(model, Skip(0.6))
        model(input_ids=INPUT_IDS, attention_mask=mask)
        with_mask = phds.active_experts(model)
        # the same tokens, real ones only, one row at a time
        phds.set_k(model, Skip(0.6))
        model(input_ids=INPUT_IDS[:1])
        model(input_ids=INPUT_IDS[1:, 4:])
        rows = phds.active_experts(model)
    # layer 0 sees the same real tokens either way (attention is causal, padding is on the left)
    assert with_mask[0] == pytest.approx(rows[0])
    phds.set_k(model, Skip(0.6))
    assert phds.active_experts(model) == {0: None, 1: None}
    phds.set_k(model, 3)
    assert phds.active_experts(model) == {0: 3.0, 1: 3.0}


def test_policies_per_layer_and_k_max():
    model = phds.tiny_model("mixtral", num_experts_per_tok=2, num_hidden_layers=3)
    with torch.no_grad():
        phds.set_k(model, {0: TopP(0.9, k_max=6), 2: 1})
        assert phds.get_k(model) == {0: TopP(0.9, k_max=6), 1: 2, 2: 1}
        assert phds.moe_layers(model)[0].router.top_k == 6
        model(INPUT_IDS)
    active = phds.active_experts(model)
    assert 1.0 <= active[0] <= 6.0 and active[1] == 2.0 and active[2] == 1.0
    assert active[0] > 2.0  # a near-uniform tiny router needs more than the pretrained 2 to reach 0.9


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: TopP(0.0), "tau"),
        (lambda: TopP(1.5), "tau"),
        (lambda: Skip(-0.1), "beta"),
        (lambda: TopP(0.5, k_max=0), "k_max"),
    ],
)
def test_bad_policies_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_a_policy_beyond_the_experts_leaves_the_model_untouched():
    model = phds.tiny_model("olmoe")
    phds.set_k(model, 2)
    with pytest.raises(ValueError, match="k_max"):
        phds.set_k(model, {0: TopP(0.5, k_max=9)})
    assert phds.get_k(model) == 2


def test_generate_and_gradients_under_a_policy():
    model = phds.tiny_model("qwen3_moe")
    phds.set_k(model, TopP(0.4))
    out = model.generate(INPUT_IDS[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)
    model.train()
    loss = model(INPUT_IDS, labels=INPUT_IDS).loss
    loss.backward()
    router = phds.moe_layers(model)[0].router
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_policy_labels_round_trip():
    for policy in (TopP(0.7), Skip(0.25, k_max=3)):
        assert parse_policy(str(policy)) == policy
    with pytest.raises(ValueError, match="top_p=TAU"):
        parse_policy("top_k=3")
