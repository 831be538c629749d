"""The "phds" experts implementation equals eager, forward and backward, and skips dropped slots."""

from __future__ import annotations

import pytest
import torch

import phds
import phds.engine  # noqa: F401  registers "phds"
from phds.engine import experts as experts_module

# Families whose experts do not use transformers' experts interface (no `@use_experts_implementation`): the tests
# parametrised over the interface skip them; "phds" covers them another way (the Llama 4 / JetMoE tests below).
NO_EXPERTS_INTERFACE = ("llama4", "jetmoe")


def _seeded(model, *args, **kwargs):
    """A forward after seeding: PhiMoE's router samples its experts in training mode, the same draws for both."""
    torch.manual_seed(0)
    return model(*args, **kwargs)


def _pair(arch: str, k) -> tuple[torch.nn.Module, torch.nn.Module]:
    if arch in NO_EXPERTS_INTERFACE:
        pytest.skip(f"{arch}'s experts do not use transformers' experts interface: no phds implementation")
    eager = phds.tiny_model(arch)
    eager.set_experts_implementation("eager")
    sparse = phds.tiny_model(arch)
    sparse.set_experts_implementation("phds")
    for model in (eager, sparse):
        model.train()
        phds.set_k(model, k)
    return eager, sparse


@pytest.mark.parametrize("k", [2, "per_row", "per_token"])
def test_phds_experts_match_eager_forward_and_backward(arch, k, input_ids):
    if k == "per_row":
        k = torch.tensor([1, 3, 4])
    elif k == "per_token":
        k = torch.randint(1, 5, input_ids.shape, generator=torch.Generator().manual_seed(1))
    eager, sparse = _pair(arch, k)
    loss_eager = _seeded(eager, input_ids, labels=input_ids).loss
    loss_sparse = _seeded(sparse, input_ids, labels=input_ids).loss
    loss_eager.backward()
    loss_sparse.backward()
    torch.testing.assert_close(loss_sparse, loss_eager, rtol=1e-5, atol=1e-6)
    for (name, p_eager), p_sparse in zip(eager.named_parameters(), sparse.parameters(), strict=True):
        if p_eager.grad is None:
            assert p_sparse.grad is None or not p_sparse.grad.any(), name
            continue
        torch.testing.assert_close(p_sparse.grad, p_eager.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_single_token_decode_path_matches_eager(arch):
    eager, sparse = _pair(arch, torch.tensor([1, 4]))
    token = torch.tensor([[5], [9]])
    torch.testing.assert_close(_seeded(sparse, token).logits, _seeded(eager, token).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 2])
def test_the_paths_taken_inside_a_compiled_graph_match_eager(monkeypatch, arch, batch):
    """Run eagerly, as if compiling: one token gathers its experts' weights by index (fused by Inductor when really
    compiled), more tokens go through the opaque `phds::sparse_experts` op."""
    eager, sparse = _pair(arch, 2)
    token = torch.tensor([[5], [9]])[:batch]
    with torch.no_grad():
        expected = eager.eval()(token).logits
    experts_module.prepare_compile(sparse.eval())
    gathered = experts_module._one_token_gathered
    calls = []
    monkeypatch.setattr(experts_module, "_one_token_gathered", lambda *args: calls.append(1) or gathered(*args))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        logits = sparse(token).logits
    monkeypatch.undo()
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    assert len(calls) == (len(phds.moe_layers(sparse)) if batch == 1 else 0)


@pytest.mark.parametrize("with_grad", [False, True])
def test_zero_weight_slots_are_never_computed(monkeypatch, with_grad):
    model = phds.tiny_model("olmoe", num_experts_per_tok=4)
    model.set_experts_implementation("phds")
    phds.set_k(model, torch.tensor([1, 3]))  # the router picks 3 slots per token; row 0 keeps 1 of them
    rows = []
    if with_grad:  # training path: one grouped matmul over the kept pairs
        grouped = experts_module._pairs_grouped
        monkeypatch.setattr(
            experts_module, "_pairs_grouped", lambda e, x, ids, n: rows.append(len(ids)) or grouped(e, x, ids, n)
        )
    else:  # batch-1 decode path: each kept expert on the one token
        mlp = experts_module._expert_mlp
        monkeypatch.setattr(experts_module, "_expert_mlp", lambda e, x, i: rows.append(x.shape[0]) or mlp(e, x, i))
        phds.set_k(model, torch.tensor([2]), epsilon=0.0, renormalize=False)  # routes k_pre=4 slots, keeps 2
    with torch.set_grad_enabled(with_grad):
        model(torch.tensor([[5], [9]]) if with_grad else torch.tensor([[5]]))
    kept = 1 + 3 if with_grad else 2
    assert sum(rows) == 2 * kept  # per layer only the kept pairs, never the routed-but-dropped slots


@pytest.mark.parametrize("arch_name", ["gpt_oss", "qwen2_moe", "deepseek_v3"])
def test_one_token_decode_path_matches_eager(arch_name):
    eager, sparse = _pair(arch_name, torch.tensor([2]))
    for model in (eager, sparse):
        model.eval()
        phds.set_k(model, torch.tensor([2]), renormalize=True)  # routes k_pre=4 slots and keeps 2 of them
    with torch.no_grad():
        for token in (5, 9, 11):
            ids = torch.tensor([[token]])
            torch.testing.assert_close(sparse(ids).logits, eager(ids).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", ["per_row", "per_token"])
def test_few_tokens_decode_path_matches_eager(monkeypatch, arch, k, input_ids):
    """Several tokens through the per-expert decode path (forced here: the tiny models have too few experts for
    the speed rule to pick it), with experts shared between tokens and per-row or per-token k."""
    calls = []
    monkeypatch.setattr(experts_module, "_few_tokens_is_faster", lambda t, s, e: calls.append(t) or True)
    ks = (
        torch.tensor([1, 3, 4])
        if k == "per_row"
        else torch.randint(1, 5, input_ids.shape, generator=torch.Generator().manual_seed(1))
    )
    eager, sparse = _pair(arch, ks)
    for model in (eager, sparse):
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(sparse(input_ids).logits, eager(input_ids).logits, rtol=1e-5, atol=1e-6)
    assert calls and all(t == input_ids.numel() for t in calls)


def test_speed_rule_sends_decode_batches_to_per_expert_calls_and_long_prefills_to_grouped():
    assert experts_module._few_tokens_is_faster(1, 8, 64)
    assert experts_module._few_tokens_is_faster(8, 8, 64)  # a decode batch of 8 at k=8
    assert experts_module._few_tokens_is_faster(64, 1, 64)  # a short prompt at k=1: 64 pairs
    assert not experts_module._few_tokens_is_faster(64, 8, 64)  # 512 pairs: 8 rows per expert
    assert not experts_module._few_tokens_is_faster(512, 1, 64)


def test_epsilon_slots_are_computed_like_eager(input_ids):
    eager, sparse = _pair("mixtral", 4)
    for model in (eager, sparse):
        phds.set_k(model, 2, epsilon=1e-3)
    torch.testing.assert_close(sparse(input_ids).logits, eager(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_registration_is_idempotent_and_load_accepts_phds():  # load imports phds.engine itself
    phds.engine.register()
    phds.engine.register()
    model, _ = phds.load("tiny:olmoe", experts_implementation="phds", tokenizer=False)
    assert model.config._experts_implementation == "phds"


def test_phds_on_llama4_never_reads_an_expert_no_token_was_routed_to(input_ids):
    """Llama 4's own experts run every expert on every token (inputs pre-scaled by 0 for the others); with "phds"
    only the routed rows are computed: experts nobody was routed to may hold NaN and the output stays exact."""
    model, _ = phds.load("tiny:llama4", experts_implementation="phds", tokenizer=False)
    reference = phds.tiny_model("llama4")
    input_ids = input_ids[:2, :2]  # 4 tokens: at k <= 2 some of the 8 experts get no token
    for k in (1, 2, torch.tensor([1, 2])):
        with torch.no_grad(), phds.sparsity(reference, k), phds.sparsity(model, k):
            routed: dict[str, set[int]] = {}

            def record(module, args, output, name=None, routed=routed):
                scores_TE = output[0]  # Llama 4's router: a weight per expert, 0 where not chosen
                routed.setdefault(name, set()).update(scores_TE.nonzero()[:, 1].tolist())

            handles = [
                layer.router.register_forward_hook(lambda m, a, o, name=layer.name: record(m, a, o, name))
                for layer in phds.moe_layers(reference)
            ]
            expected = reference(input_ids).logits
            for handle in handles:
                handle.remove()
            poisoned = 0
            for layer in phds.moe_layers(model):
                unused = [e for e in range(layer.num_experts) if e not in routed[layer.name]]
                layer.experts.gate_up_proj.data[unused] = float("nan")
                poisoned += len(unused)
            assert poisoned > 0
            torch.testing.assert_close(model(input_ids).logits, expected, rtol=1e-5, atol=1e-5)
            model.load_state_dict(reference.state_dict())


def test_phds_on_jetmoe_lists_only_the_kept_slots_to_its_own_experts(input_ids):
    """JetMoE's experts compute exactly the slots its router lists; under a per-token k the dial lists only the kept
    ones, so a dropped slot costs nothing (the "phds" behaviour, with the family's own experts)."""
    model, _ = phds.load("tiny:jetmoe", experts_implementation="phds", tokenizer=False)
    input_ids = input_ids[:2]
    per_row = torch.tensor([1, 3])
    rows_computed = []
    mlp_experts = [layer.experts for layer in phds.moe_layers(model) if layer.name.endswith("mlp")]
    handles = [
        e.register_forward_hook(lambda m, args, out: rows_computed.append(args[0].shape[0])) for e in mlp_experts
    ]
    with torch.no_grad():
        with phds.sparsity(model, per_row):
            dropped_listed = model(input_ids).logits
        with phds.sparsity(model, per_row, epsilon=1e-30):  # every slot listed, the dropped ones at ~0 weight
            all_listed = model(input_ids).logits
    for handle in handles:
        handle.remove()
    tokens_per_row = input_ids.shape[1]
    kept = int(per_row.sum()) * tokens_per_row
    listed = phds.dial.k_pre(model) * len(per_row) * tokens_per_row  # with an epsilon the router runs at k_pre
    assert rows_computed[: len(mlp_experts)] == [kept] * len(mlp_experts)
    assert rows_computed[len(mlp_experts) :] == [listed] * len(mlp_experts)
    torch.testing.assert_close(dropped_listed, all_listed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch_name", ["phimoe", "afmoe"])
def test_phds_experts_on_phimoe_and_afmoe_match_eager_in_the_default_run(arch_name, input_ids):
    """The default run's check of the two families of issue 18 that take the experts interface (the parametrised
    tests above run them under `-m slow`): per-row k around PhiMoE's fixed 2 slots, forward and backward."""
    eager, sparse = _pair(arch_name, torch.tensor([1, 3, 4]))
    losses = [_seeded(model, input_ids, labels=input_ids).loss for model in (eager, sparse)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p_eager), p_sparse in zip(eager.named_parameters(), sparse.parameters(), strict=True):
        if p_eager.grad is not None:
            torch.testing.assert_close(p_sparse.grad, p_eager.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert sparse.config._experts_implementation == "phds"
