"""`phds.routing` on plain tensors: which slots a token keeps, how the kept weights are rescaled, and the shapes."""

from __future__ import annotations

import pytest
import torch

from phds.routing import expand_k_per_token, keep_top_slots, slot_ranks


def _by_hand(weights_TK, score_TK, k_T, renormalize, epsilon=0.0):
    """One token at a time, with Python lists: keep the `k` best slots by score, earlier slot first on a tie."""
    rows = []
    for weights, scores, k in zip(weights_TK.tolist(), score_TK.tolist(), k_T.tolist(), strict=True):
        best = sorted(range(len(scores)), key=lambda slot: (-scores[slot], slot))[:k]
        kept = [w if slot in best else 0.0 for slot, w in enumerate(weights)]
        if renormalize:
            kept = [w * sum(weights) / sum(kept) for w in kept]
        rows.append([w if slot in best else epsilon for slot, w in enumerate(kept)])
    return torch.tensor(rows, dtype=weights_TK.dtype)


# ----------------------------------------------------------------------------- expand_k_per_token


def test_per_row_k_is_repeated_over_each_rows_tokens():
    assert expand_k_per_token(torch.tensor([1, 4]), 6).tolist() == [1, 1, 1, 4, 4, 4]
    assert expand_k_per_token(torch.tensor([3]), 4).tolist() == [3, 3, 3, 3]


def test_per_token_k_is_flattened_row_major():
    k_BS = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert expand_k_per_token(k_BS, 6).tolist() == [1, 2, 3, 4, 5, 6]


def test_a_per_row_k_that_does_not_divide_the_tokens_is_rejected():
    with pytest.raises(ValueError, match="per-row k has 2 rows but this forward routes 5 tokens"):
        expand_k_per_token(torch.tensor([1, 2]), 5)


def test_a_per_token_k_of_the_wrong_size_is_rejected_even_when_it_would_divide():
    with pytest.raises(ValueError, match=r"per-token k has shape \(2, 2\) \(4 tokens\) but this forward routes 8"):
        expand_k_per_token(torch.ones(2, 2, dtype=torch.long), 8)


# ----------------------------------------------------------------------------- slot_ranks


def test_slot_ranks_rank_unsorted_slots_by_score():
    scores_TK = torch.tensor([[0.1, 0.7, 0.3, 0.5], [2.0, -1.0, 0.0, 1.0]])
    assert slot_ranks(scores_TK).tolist() == [[3, 0, 2, 1], [0, 3, 2, 1]]


def test_slot_ranks_break_ties_by_slot_order():
    assert slot_ranks(torch.tensor([[0.5, 1.0, 0.5, 1.0]])).tolist() == [[2, 0, 3, 1]]


def test_slot_ranks_are_a_permutation_per_token():
    scores_TK = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)).round(decimals=1)  # with ties
    ranks_TK = slot_ranks(scores_TK)
    assert torch.equal(ranks_TK.sort(dim=-1).values, torch.arange(6).expand(50, 6))


# ----------------------------------------------------------------------------- keep_top_slots


@pytest.mark.parametrize("renormalize", [False, True])
def test_kept_slots_and_weights_match_a_direct_computation(renormalize):
    generator = torch.Generator().manual_seed(1)
    weights_TK = torch.rand(40, 5, generator=generator) + 0.01
    score_TK = torch.randn(40, 5, generator=generator)
    k_T = torch.randint(1, 6, (40,), generator=generator)
    got = keep_top_slots(weights_TK, score_TK, k_T, renormalize=renormalize)
    torch.testing.assert_close(got, _by_hand(weights_TK, score_TK, k_T, renormalize))
    assert ((got > 0).sum(-1) == k_T).all()


def test_slots_are_chosen_by_the_selection_score_not_the_weight():
    # DeepSeek-V3 style: the expert with the smaller weight can have the higher (bias-corrected) selection score.
    weights_TK = torch.tensor([[0.5, 0.3, 0.2]])
    score_TK = torch.tensor([[0.1, 0.9, 0.5]])
    got = keep_top_slots(weights_TK, score_TK, torch.tensor([1]), renormalize=False)
    assert got.tolist() == [[0.0, pytest.approx(0.3), 0.0]]


def test_a_tie_in_the_selection_score_keeps_the_earlier_slot():
    weights_TK = torch.tensor([[0.2, 0.3, 0.5]])
    score_TK = torch.tensor([[0.4, 0.4, 0.1]])
    got = keep_top_slots(weights_TK, score_TK, torch.tensor([1]), renormalize=False)
    assert got.tolist() == [[pytest.approx(0.2), 0.0, 0.0]]


def test_renormalised_softmax_weights_equal_the_softmax_router_run_at_that_k():
    """A normalising router at k_max, cut to k and renormalised, is that router run at k."""
    probs_TE = torch.randn(30, 8, generator=torch.Generator().manual_seed(2)).softmax(-1)
    top_max_weights_TK, top_max_experts_TK = probs_TE.topk(6, dim=-1)
    weights_TK = top_max_weights_TK / top_max_weights_TK.sum(-1, keepdim=True)
    for k in range(1, 7):
        got = keep_top_slots(weights_TK, weights_TK, torch.full((30,), k), renormalize=True)
        at_k_weights_Tk, at_k_experts_Tk = probs_TE.topk(k, dim=-1)
        expected = torch.zeros(30, 8).scatter(-1, at_k_experts_Tk, at_k_weights_Tk / at_k_weights_Tk.sum(-1, True))
        as_experts = torch.zeros(30, 8).scatter(-1, top_max_experts_TK, got)
        torch.testing.assert_close(as_experts, expected)


def test_renormalisation_keeps_the_total_mass_and_the_ratios_of_the_kept_weights():
    weights_TK = torch.tensor([[0.4, 0.1, 0.3, 0.2], [1.0, 2.0, 3.0, 4.0]])  # second row: a scaled router, sum 10
    got = keep_top_slots(weights_TK, weights_TK, torch.tensor([2, 3]), renormalize=True)
    torch.testing.assert_close(got.sum(-1), weights_TK.sum(-1))
    torch.testing.assert_close(got[0], torch.tensor([0.4, 0.0, 0.3, 0.0]) * (1.0 / 0.7))
    torch.testing.assert_close(got[1], torch.tensor([0.0, 2.0, 3.0, 4.0]) * (10.0 / 9.0))


def test_k_equal_to_the_slot_count_changes_nothing():
    weights_TK = torch.rand(7, 4, generator=torch.Generator().manual_seed(3))
    for renormalize in (False, True):
        got = keep_top_slots(weights_TK, weights_TK, torch.full((7,), 4), renormalize=renormalize)
        torch.testing.assert_close(got, weights_TK)


@pytest.mark.parametrize("renormalize", [False, True])
def test_epsilon_replaces_only_the_dropped_weights(renormalize):
    generator = torch.Generator().manual_seed(4)
    weights_TK = torch.rand(20, 4, generator=generator) + 0.01
    k_T = torch.randint(1, 5, (20,), generator=generator)
    without = keep_top_slots(weights_TK, weights_TK, k_T, renormalize=renormalize)
    got = keep_top_slots(weights_TK, weights_TK, k_T, renormalize=renormalize, epsilon=1e-6)
    dropped_TK = without == 0
    assert (got[dropped_TK] == 1e-6).all()
    assert torch.equal(got[~dropped_TK], without[~dropped_TK])  # kept weights are not renormalised over epsilon
    torch.testing.assert_close(got, _by_hand(weights_TK, weights_TK, k_T, renormalize, epsilon=1e-6))


def test_shape_and_dtype_are_kept_and_the_inputs_are_not_modified():
    weights_TK = torch.rand(5, 3, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    before = weights_TK.clone()
    got = keep_top_slots(weights_TK, weights_TK.float(), torch.tensor([1, 2, 3, 1, 2]), renormalize=True)
    assert got.shape == (5, 3) and got.dtype == torch.bfloat16
    assert torch.equal(weights_TK, before)


def test_no_gradient_reaches_a_dropped_slot_without_renormalisation():
    weights_TK = torch.rand(6, 4, generator=torch.Generator().manual_seed(6)).requires_grad_()
    k_T = torch.tensor([1, 2, 3, 4, 1, 2])
    keep_top_slots(weights_TK, weights_TK.detach(), k_T, renormalize=False).sum().backward()
    kept_TK = slot_ranks(weights_TK.detach()) < k_T.unsqueeze(-1)
    assert torch.equal(weights_TK.grad, kept_TK.float())
