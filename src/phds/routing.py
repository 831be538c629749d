"""Pure tensor functions behind per-row / per-token k: keep each token's best `k` of a top-`k_max` routing.

Shape suffixes: T tokens (flattened batch x sequence), K slots chosen by the router (k_max), B rows, S sequence.

The router is run once at `k_max`; a token that asks for `k <= k_max` keeps the `k` slots that the router would
have picked at `k` (the best `k` by the router's own selection score) and the rest get weight 0 (or a tiny
epsilon). Routers that normalise their top-k weights are renormalised over the kept slots, so every token gets
exactly the routing it would get with that k set globally.
"""

from __future__ import annotations

import torch


def expand_k_per_token(k: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Turn a `(B,)` per-row or `(B, S)` per-token k into one k per flattened token, shape `(T,)`.

    Args:
        k: LongTensor `(B,)` or `(B, S)`.
        num_tokens: how many tokens the router sees in this forward (`B * S`).

    Example: `expand_k_per_token(torch.tensor([1, 4]), 6)` -> `tensor([1, 1, 1, 4, 4, 4])`.
    """
    if k.dim() == 1:
        if num_tokens % k.numel() != 0:
            raise ValueError(
                f"per-row k has {k.numel()} rows but this forward routes {num_tokens} tokens, "
                "which is not a whole number of tokens per row; pass one k per row of the batch"
            )
        return k.repeat_interleave(num_tokens // k.numel())
    if k.numel() != num_tokens:
        raise ValueError(
            f"per-token k has shape {tuple(k.shape)} ({k.numel()} tokens) but this forward routes {num_tokens} "
            "tokens; a (batch, seq) k must match the input_ids of the forward it is used for"
        )
    return k.reshape(-1)


def slot_ranks(selection_score_TK: torch.Tensor) -> torch.Tensor:
    """Rank of each chosen slot within its token (0 = the router's best), shape `(T, K)`.

    Routers do not all return their slots sorted (DeepSeek-V3 uses `sorted=False`), so rank explicitly.
    """
    order_TK = selection_score_TK.argsort(dim=-1, descending=True, stable=True)
    return order_TK.argsort(dim=-1)


def keep_top_slots(
    weights_TK: torch.Tensor,
    selection_score_TK: torch.Tensor,
    k_T: torch.Tensor,
    *,
    renormalize: bool,
    epsilon: float = 0.0,
) -> torch.Tensor:
    """Weights after dropping, for each token, every slot ranked `>= k_T[token]`.

    Args:
        weights_TK: the router's top-`k_max` weights.
        selection_score_TK: the score the router picked its experts by, gathered at the chosen slots.
        k_T: experts to keep per token (`1 <= k_T <= K`).
        renormalize: rescale the kept weights so they sum to what all `K` weights summed to (what a router that
            normalises its top-k weights does at a lower k, routed scaling factors included).
        epsilon: weight given to dropped slots instead of 0 (the paper's faithful-reproduction option).

    Example: `keep_top_slots(w, w, torch.full((T,), 2), renormalize=False)` zeroes all but the best 2 slots.
    """
    keep_TK = slot_ranks(selection_score_TK) < k_T.to(weights_TK.device).unsqueeze(-1)
    kept_TK = weights_TK.masked_fill(~keep_TK, 0.0)
    if renormalize:
        total_T1 = weights_TK.sum(dim=-1, keepdim=True)
        kept_TK = kept_TK * (total_T1 / kept_TK.sum(dim=-1, keepdim=True))
    if epsilon:
        kept_TK = kept_TK.masked_fill(~keep_TK, epsilon)
    return kept_TK
