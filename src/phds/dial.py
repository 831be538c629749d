"""The k dial: how many experts each token uses, changed on an already loaded transformers MoE model.

This is the only module that knows router internals. Routers are found by what they are -- a module holding an
integer `top_k` and a 2-D `weight` of one row per expert, next to a module of stacked experts -- not by a list of
class names, so every transformers MoE family built that way can be dialled.

How a k is applied:
- an int `k` in every layer: the router's own `top_k` is set to `k`; transformers' code then does everything
  (renormalisation, scaling, the experts implementation) exactly as a model built with `num_experts_per_tok=k`;
- a per-row `(B,)` or per-token `(B, S)` LongTensor, an epsilon for dropped experts, or a renormalisation
  override: the router runs at `k_max` and a forward hook drops, per token, the slots beyond that token's k
  (`phds.routing.keep_top_slots`);
- a routing policy (`phds.TopP`, `phds.Skip`): the router runs at the policy's `k_max` and the same hook computes
  each token's k from the router's own probabilities and weights (`phds.policies`), and counts the experts it kept
  (`active_experts`), padding excluded.

What a router returns is read off probe forwards at `top_k` 1 and 2 (`_Layout`), not from its class: (logits,
top-k weights, top-k indices) in any order (most families); a weight per expert, 0 where not chosen, beside the logits
(Llama 4); or the chosen slots sorted by expert, flat (JetMoE). A router handed more than hidden states gets them
from its block by name (AFMoE's `expert_bias`). Modules above a router that keep a copy of its `top_k` (Mixtral's
block, JetMoE's attention, which repeats its keys `top_k` times) are set with it.

Rules where transformers' own code does not follow k:
- a router that picks a fixed number of slots whatever `top_k` says (PhiMoE's sparsemixer: 2) has that width as
  k_pre. Below it, each token keeps its first k slots (in the order picked) with the weights the router gave them
  (no renormalisation: each slot's weight is its own softmax). Above it, the dial continues the router's own
  slot-by-slot rule: the next slot is the best expert not taken yet, weighted by the softmax, over the experts not
  taken yet whose logit lies within a relative `2 * router_jitter_noise` of its logit, taken at that expert. The
  rule is checked at registration against the router's own slots (in eval mode); a fixed-width router it does not
  reproduce cannot be dialled above its width.
- bias-corrected routers (DeepSeek-V3, AFMoE) choose by sigmoid(logits) + bias (`_choice_bias`), the one per-family
  fact the dial holds.

The dial's state lives on the router modules (`_phds_*` attributes) and is restored by `sparsity()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import numbers
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from phds.policies import Skip, TopP
from phds.routing import expand_k_per_token, keep_top_slots

logger = logging.getLogger(__name__)

KSpec = int | Mapping[int, "int | TopP | Skip"] | torch.Tensor | TopP | Skip

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)(?:\.|$)")


class NotAnMoEError(ValueError, TypeError):
    """The model has no MoE layer that the dial can find (a dense model, or an MoE family built another way)."""


@dataclass(frozen=True)
class MoELayer:
    """One MoE layer of a model, as the dial sees it.

    Attributes:
        index: decoder layer index (the `N` in `model.layers.N`).
        name: module path of the MoE block.
        block: the MoE block module (router + experts + shared experts).
        router: the top-k router module.
        experts: the stacked routed experts module.
        num_experts: number of routed experts.
        k_pre: the pretrained top-k (`config.num_experts_per_tok` when the model was loaded).
        renormalizes: whether the router rescales its top-k weights to a fixed sum (Mixtral, GPT-OSS, Qwen3-MoE,
            DeepSeek-V3 with `norm_topk_prob`); OLMoE and Qwen1.5-MoE do not.
        shared_experts: always-on experts of the block (Qwen2-MoE's `shared_expert`, DeepSeek's `shared_experts`).
        lists_slots: the router hands its experts the list of (token, expert) slots to compute (JetMoE's), and the
            dial lists only the kept ones, so the family's own experts compute only kept pairs.
        top_k_copies: modules above the router that keep their own copy of its `top_k` (Mixtral's block, JetMoE's
            attention and its experts), set with it.
    """

    index: int
    name: str
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    num_experts: int
    k_pre: int
    renormalizes: bool
    shared_experts: tuple[nn.Module, ...]
    top_k_copies: tuple[nn.Module, ...] = ()
    lists_slots: bool = False


@dataclass(frozen=True)
class _Plan:
    """What one router does: `k` experts per token (int, per-row/per-token tensor, or a routing policy),
    dropped-slot epsilon, and an optional renormalisation override (None follows the router)."""

    k: int | torch.Tensor | TopP | Skip
    epsilon: float = 0.0
    renormalize: bool | None = None


# ----------------------------------------------------------------------------- discovery


def _router_weight(module: nn.Module) -> torch.Tensor | None:
    """The (num_experts, hidden) projection a router scores experts with: its own `weight`, or the weight of its
    single linear child (HunYuan's `wg`, AFMoE's `gate`)."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight
    linears = [child for child in module.children() if isinstance(child, nn.Linear)]
    return linears[0].weight if len(linears) == 1 else None


def _is_router(module: nn.Module) -> bool:
    top_k = getattr(module, "top_k", None)
    return (
        isinstance(top_k, int)
        and not isinstance(top_k, bool)
        and type(module) not in (nn.Linear, nn.Embedding)
        and _router_weight(module) is not None
    )


def _stacked_experts(block: nn.Module, router: nn.Module) -> nn.Module | None:
    for name, child in block.named_children():
        if child is router or "shared" in name:
            continue
        child = _unwrap_adapters(child)
        if any(p.dim() == 3 for p in child.parameters(recurse=False)):
            return child
    return None


def _unwrap_adapters(module: nn.Module) -> nn.Module:
    """Look through PEFT wrappers (LoRA's `ParamWrapper` on 3-D expert parameters keeps the experts as `base_layer`)."""
    while not any(p.dim() == 3 for p in module.parameters(recurse=False)):
        inner = getattr(module, "base_layer", None)
        if not isinstance(inner, nn.Module) or inner is module:
            break
        module = inner
    return module


@dataclass(frozen=True)
class _Layout:
    """Where a router's output carries its routing, read off probe forwards (see `_read_layout`).

    kind: "top_k" -- (logits (T, E), weights (T, K), indices (T, K)) in some order (most families);
        "dense" -- (weights (T, E), logits (T, E)): a weight per expert, 0 for experts not chosen (Llama 4);
        "sorted" -- (slot order, token of each entry, weights, entries per expert, logits): the T*K chosen slots
        sorted by expert, flat (JetMoE).
    positions: index in the output tuple of each part, in the order just listed.
    width: the number of slots a router picks whatever its `top_k` says (PhiMoE's sparsemixer: 2); None when the
        router follows `top_k`.
    slot_by_slot: the fixed-width router picks slot by slot, so slots beyond its width continue the same rule
        (`_pick_slot_by_slot`, checked against the router's own slots at registration).
    extra_args: names of the tensors the router is handed after the hidden states, taken from its block of the
        same name (AFMoE's `expert_bias`).
    """

    kind: str
    positions: tuple[int, ...]
    width: int | None = None
    slot_by_slot: bool = False
    extra_args: tuple[str, ...] = ()


def _router_inputs(router: nn.Module, block: nn.Module | None) -> tuple[str, ...]:
    """Required arguments of the router's forward after the hidden states: tensors its block holds by that name."""
    try:
        parameters = list(inspect.signature(router.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return ()
    names = tuple(
        p.name
        for p in parameters
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    )
    missing = [name for name in names if not isinstance(getattr(block, name, None), torch.Tensor)]
    if missing:
        raise NotAnMoEError(
            f"router {type(router).__name__} takes {missing} besides hidden states, which its block does not hold; "
            "this MoE family cannot be dialled"
        )
    return names


def _call_router(router: nn.Module, block: nn.Module | None, hidden_TD: torch.Tensor, extra_args: tuple[str, ...]):
    """One probe forward in eval mode (no sampling, no jitter): on (T, D) hidden states, else on (1, T, D)."""
    extra = [getattr(block, name) for name in extra_args]
    was_training = router.training
    router.train(False)
    try:
        with torch.no_grad():
            try:
                return router(hidden_TD, *extra)
            except Exception:  # a router that reads (batch, seq, hidden) (AFMoE)
                return router(hidden_TD.unsqueeze(0), *extra)
    finally:
        router.train(was_training)


_PROBE_KS = (1, 2)  # the top_k values a router is probed at


def _probe(router: nn.Module, block: nn.Module | None, num_experts: int) -> tuple[_Layout, bool]:
    """The router's output layout and whether it renormalises its top-k weights, asked of the router itself at
    `top_k` 1 and 2 on random hidden states."""
    name = type(router).__name__
    extra_args = _router_inputs(router, block)
    weight = _router_weight(router)
    hidden_TD = torch.randn(32, weight.shape[1], generator=torch.Generator().manual_seed(1)).to(
        weight.device, weight.dtype
    )
    saved = router.top_k
    outputs = []
    try:
        for k in _PROBE_KS:
            router.top_k = k
            outputs.append(_call_router(router, block, hidden_TD, extra_args))
    except Exception as error:
        raise NotAnMoEError(
            f"router {name} cannot be called on hidden states ({error}); this MoE family cannot be dialled"
        ) from error
    finally:
        router.top_k = saved
    if not all(isinstance(out, tuple) for out in outputs):
        raise NotAnMoEError(
            f"router {name} returns {type(outputs[0]).__name__}, not a tuple of routing tensors; "
            "this MoE family cannot be dialled"
        )
    layout = _read_layout(outputs, hidden_TD.shape[0], num_experts)
    if layout is None:
        raise NotAnMoEError(
            f"router {name} does not return router logits with top-k weights and indices (or a weight per expert, or "
            "the chosen slots sorted by expert); this MoE family cannot be dialled"
        )
    layout = dataclasses.replace(layout, extra_args=extra_args)
    views = [_read_routing(layout, out, k) for out, k in zip(outputs, _PROBE_KS, strict=True)]
    if layout.width is not None:
        logits, weights_TK, indices_TK = views[0]
        empty = indices_TK[:, :0]
        picked = _pick_slot_by_slot(logits, weights_TK[:, :0], empty, layout.width, _slot_threshold(router))
        same = torch.equal(picked[1], indices_TK) and torch.allclose(picked[0], weights_TK, rtol=1e-5, atol=1e-6)
        layout = dataclasses.replace(layout, slot_by_slot=same)
    sums = [weights_TK.float().sum(-1) for _, weights_TK, _ in views]
    first = sums[0][0]
    renormalizes = all(torch.allclose(s, first.expand_as(s), rtol=1e-4, atol=1e-5) for s in sums)
    return layout, renormalizes


def _read_layout(outputs: list[tuple], num_tokens: int, num_experts: int) -> _Layout | None:
    """Recognise the layout from what the router returned at top_k 1 and 2 (see `_Layout`)."""
    out1, out2 = outputs[0], outputs[-1]

    def floats(out, numel):
        return [
            i
            for i, t in enumerate(out)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() == numel
        ]

    def ints(out):
        return [i for i, t in enumerate(out) if isinstance(t, torch.Tensor) and not t.is_floating_point()]

    per_expert = [i for i in floats(out1, num_tokens * num_experts) if out1[i].shape[-1] == num_experts]
    # top_k: integer (T, K) indices beside float weights of the same shape and (T, E) logits.
    for i in ints(out1):
        indices = out1[i]
        if indices.dim() < 2 or indices.numel() // indices.shape[-1] != num_tokens:
            continue
        weights = [w for w in floats(out1, indices.numel()) if out1[w].shape == indices.shape and w not in per_expert]
        if weights and per_expert:
            widths = (indices.shape[-1], out2[i].shape[-1])
            if widths == _PROBE_KS:  # follows top_k
                return _Layout("top_k", (per_expert[0], weights[0], i))
            if widths[0] == widths[1]:  # picks a fixed number of slots whatever top_k says
                return _Layout("top_k", (per_expert[0], weights[0], i), width=widths[0])
            return None
    # dense: two (T, E) float tensors, one of them non-zero at exactly top_k experts per token.
    if len(per_expert) >= 2 and not ints(out1):
        for w in per_expert:
            nonzero = [(out[w].reshape(num_tokens, -1) != 0).sum(-1) for out in outputs]
            if all(bool((n == k).all()) for n, k in zip(nonzero, _PROBE_KS, strict=True)):
                logits = next(i for i in per_expert if i != w)
                return _Layout("dense", (w, logits))
    # sorted: at top_k 2, a permutation of the 2T slots, the token of each entry, 2T weights, entries per expert.
    k = _PROBE_KS[-1]
    long_1d = [i for i in ints(out2) if out2[i].dim() == 1 and out2[i].numel() == num_tokens * k]
    order = [i for i in long_1d if torch.equal(out2[i].sort().values.cpu(), torch.arange(num_tokens * k))]
    per_expert2 = [i for i in floats(out2, num_tokens * num_experts) if out2[i].shape[-1] == num_experts]
    for o in order:
        tokens = [i for i in long_1d if i != o and torch.equal(out2[i], out2[o] // k)]
        gates = [i for i in floats(out2, num_tokens * k) if out2[i].dim() == 1]
        sizes = [
            i
            for i, s in enumerate(out2)
            if isinstance(s, (list, tuple, torch.Tensor))
            and len(s) == num_experts
            and sum(int(n) for n in s) == k * num_tokens
        ]
        if tokens and gates and sizes and per_expert2:
            return _Layout("sorted", (o, tokens[0], gates[0], sizes[0], per_expert2[0]))
    return None


def _read_routing(layout: _Layout, output: tuple, k: int | None = None):
    """(logits (T, E), weights (T, K), indices (T, K)) from a router's output, whatever its layout."""
    if layout.kind == "top_k":
        logits_pos, weights_pos, indices_pos = layout.positions
        weights, indices = output[weights_pos], output[indices_pos]
        logits = output[logits_pos]
        return (
            logits.reshape(-1, logits.shape[-1]),
            weights.reshape(-1, weights.shape[-1]),
            indices.reshape(-1, indices.shape[-1]),
        )
    if layout.kind == "dense":
        weights_pos, logits_pos = layout.positions
        weights_TE = output[weights_pos].reshape(-1, output[weights_pos].shape[-1])
        logits_TE = output[logits_pos].reshape(-1, output[logits_pos].shape[-1])
        k = int((weights_TE[:1] != 0).sum()) if k is None else k
        indices_TK = logits_TE.topk(k, dim=-1).indices  # the experts given a weight are the top-k logits
        return logits_TE, weights_TE.gather(-1, indices_TK), indices_TK
    order_pos, _, gates_pos, sizes_pos, logits_pos = layout.positions
    logits_TE = output[logits_pos].reshape(-1, output[logits_pos].shape[-1])
    order, gates = output[order_pos], output[gates_pos]
    num_tokens = logits_TE.shape[0]
    expert_of_entry = _expert_of_entries(output[sizes_pos], order.device)
    # a listing the dial cut to the kept slots (`_write_routing`) has fewer entries than T x k: the slots it left
    # out read as weight 0 at expert -1
    slots = num_tokens * k if k is not None else gates.shape[0]
    weights_TK = gates.new_zeros(slots).index_copy(0, order, gates).reshape(num_tokens, -1)
    indices_TK = order.new_full((slots,), -1).index_copy(0, order, expert_of_entry).reshape(num_tokens, -1)
    return logits_TE, weights_TK, indices_TK


def _expert_of_entries(sizes, device) -> torch.Tensor:
    """The expert of each entry of a listing sorted by expert, from its entries per expert (JetMoE's `expert_size`)."""
    sizes_E = torch.as_tensor([int(n) for n in sizes], device=device)
    return torch.arange(len(sizes_E), device=device).repeat_interleave(sizes_E)


def _write_routing(
    layout: _Layout, output: tuple, weights_TK: torch.Tensor, indices_TK: torch.Tensor, drop_zero: bool = False
) -> tuple:
    """The router's output with its weights (and, for a continued fixed-width router, its slots) replaced. With
    `drop_zero`, a router whose output lists the chosen slots themselves (JetMoE's, sorted by expert) lists only the
    kept ones: the family's own experts then compute only the kept pairs, as the "phds" experts do elsewhere."""
    output = list(output)
    if layout.kind == "top_k":
        _, weights_pos, indices_pos = layout.positions
        old_weights, old_indices = output[weights_pos], output[indices_pos]
        shape = (*old_weights.shape[:-1], weights_TK.shape[-1])
        output[weights_pos] = weights_TK.to(old_weights.dtype).reshape(shape)
        output[indices_pos] = indices_TK.to(old_indices.dtype).reshape(shape)
    elif layout.kind == "dense":
        weights_pos, _ = layout.positions
        old = output[weights_pos]
        dense_TE = old.reshape(-1, old.shape[-1]).new_zeros(indices_TK.shape[0], old.shape[-1])
        output[weights_pos] = dense_TE.scatter(-1, indices_TK, weights_TK.to(old.dtype)).reshape(old.shape)
    else:
        order_pos, tokens_pos, gates_pos, sizes_pos, _ = layout.positions
        old = output[gates_pos]
        gates_P = weights_TK.to(old.dtype).reshape(-1)[output[order_pos]]
        if drop_zero:
            sizes = output[sizes_pos]
            expert_P = _expert_of_entries(sizes, gates_P.device)
            keep_P = gates_P != 0
            output[order_pos], output[tokens_pos] = output[order_pos][keep_P], output[tokens_pos][keep_P]
            gates_P = gates_P[keep_P]
            kept_E = torch.bincount(expert_P[keep_P], minlength=len(sizes))
            output[sizes_pos] = kept_E.tolist() if isinstance(sizes, (list, tuple)) else kept_E.to(sizes.dtype)
        output[gates_pos] = gates_P
    return tuple(output)


def _slot_threshold(router: nn.Module) -> float:
    """How close (relative) to the best remaining logit an expert must be to share a slot's softmax: PhiMoE's
    sparsemixer calls it `router_jitter_noise` (and compares against twice it); 0 without one."""
    return float(getattr(router, "router_jitter_noise", 0.0) or 0.0)


def _pick_slot_by_slot(
    logits_TE: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor, k: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend the chosen slots to `k`, one slot at a time (PhiMoE's sparsemixer rule, continued): the next slot is
    the best expert not chosen yet, weighted by the softmax, over the experts not chosen yet whose logit is within
    a relative `2 * threshold` of it, taken at that expert."""
    weights, indices = [weights_TK], [indices_TK]
    taken_TE = torch.zeros_like(logits_TE, dtype=torch.bool).scatter(-1, indices_TK, True)
    for _ in range(indices_TK.shape[-1], k):
        remaining_TE = logits_TE.masked_fill(taken_TE, float("-inf"))
        best_T1, index_T1 = remaining_TE.max(dim=-1, keepdim=True)
        with torch.no_grad():
            far_TE = (best_T1 - logits_TE) / logits_TE.abs().clamp(min=best_T1) > 2 * threshold
        gates_TE = remaining_TE.masked_fill(far_TE, float("-inf")).softmax(dim=-1)
        weights.append(gates_TE.gather(-1, index_T1).to(weights_TK.dtype))
        indices.append(index_T1)
        taken_TE = taken_TE.scatter(-1, index_T1, True)
    return torch.cat(weights, dim=-1), torch.cat(indices, dim=-1)


def _register(router: nn.Module, num_experts: int, block: nn.Module | None) -> None:
    """First touch of a router: remember its pretrained k, its output layout and install the (idle) hook."""
    if getattr(router, "_phds_k_pre", None) is not None:
        return
    layout, renormalizes = _probe(router, block, num_experts)
    if hasattr(router, "norm_topk_prob"):
        renormalizes = bool(router.norm_topk_prob)
    router._phds_k_pre = layout.width or router.top_k
    router._phds_layout = layout
    router._phds_renormalizes = renormalizes
    router._phds_plan = _Plan(k=router._phds_k_pre)
    router._phds_kept = None  # (experts kept, tokens routed) under a policy, since it was set
    router.register_forward_hook(_drop_slots_hook, with_kwargs=True)


class _TokenMask:
    """The 2-D attention mask of the model's current forward, read by the hook so that padding is not counted."""

    mask: torch.Tensor | None = None


def _capture_attention_mask(model: nn.Module, args: tuple, kwargs: dict) -> None:
    mask = kwargs.get("attention_mask")
    model._phds_token_mask.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _watch_attention_mask(model: nn.Module, routers: list[nn.Module]) -> None:
    if not isinstance(getattr(model, "_phds_token_mask", None), _TokenMask):
        model._phds_token_mask = _TokenMask()
        model.register_forward_pre_hook(_capture_attention_mask, with_kwargs=True)
    for router in routers:
        if getattr(router, "_phds_token_mask_of", None) is None:
            router._phds_token_mask_of = model._phds_token_mask


def _top_k_copies(modules: dict[str, nn.Module], router_name: str) -> tuple[nn.Module, ...]:
    """Ancestors of the router holding an int `top_k` equal to its own: copies the forward reads (JetMoE's attention
    repeats its keys `top_k` times)."""
    top_k = modules[router_name].top_k
    parts = router_name.split(".")
    ancestors = (modules.get(".".join(parts[:i])) for i in range(1, len(parts)))
    return tuple(
        module
        for module in ancestors
        if module is not None
        and isinstance(module.__dict__.get("top_k"), int)
        and not isinstance(module.__dict__.get("top_k"), bool)
        and module.__dict__["top_k"] == top_k
    )


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of `model`, in layer order.

    Args:
        model: any transformers model (or submodule) whose MoE blocks hold a top-k router and stacked experts.

    Raises:
        NotAnMoEError (a ValueError): the model has no MoE layer the dial can find.

    Example: `[(l.index, l.num_experts, l.k_pre) for l in phds.moe_layers(model)]`.
    """
    modules = dict(model.named_modules())
    layers: list[MoELayer] = []
    for name, module in modules.items():
        if not name or not _is_router(module):
            continue
        parent_name = name.rpartition(".")[0]
        block = modules.get(parent_name)
        experts = _stacked_experts(block, module) if block is not None else None
        if experts is None:
            continue
        num_experts = int(getattr(module, "num_experts", None) or _router_weight(module).shape[0])
        _register(module, num_experts, block)
        match = _LAYER_INDEX.search(name)
        shared = tuple(
            child
            for child_name, child in block.named_children()
            if "shared" in child_name and not child_name.endswith("gate")
        )
        layers.append(
            MoELayer(
                index=int(match.group(1)) if match else len(layers),
                name=parent_name,
                block=block,
                router=module,
                experts=experts,
                num_experts=num_experts,
                k_pre=module._phds_k_pre,
                renormalizes=module._phds_renormalizes,
                shared_experts=shared,
                top_k_copies=_top_k_copies(modules, name),
                lists_slots=module._phds_layout.kind == "sorted",
            )
        )
    if not layers:
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "num_experts_per_tok", None) is not None:
            raise NotAnMoEError(
                f"{type(model).__name__} declares num_experts_per_tok={config.num_experts_per_tok} but has no router "
                "module with an integer `top_k` next to stacked experts; this MoE family cannot be dialled"
            )
        raise NotAnMoEError(f"{type(model).__name__} has no MoE layers: nothing to dial")
    _watch_attention_mask(model, [layer.router for layer in layers])
    return layers


# ----------------------------------------------------------------------------- the hook


def _choice_bias(router: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The one per-family fact the dial holds: bias-corrected routers choose experts by sigmoid(logits) + a
    per-expert bias and weigh them by sigmoid(logits) alone. The bias is the router's own (DeepSeek-V3's
    `e_score_correction_bias`) or handed to it by its block (AFMoE's `expert_bias`)."""
    bias = getattr(router, "e_score_correction_bias", None)
    if isinstance(bias, torch.Tensor):
        return bias
    handed = dict(zip(router._phds_layout.extra_args, args[1:], strict=False)) | kwargs
    bias = handed.get("expert_bias")
    return bias if isinstance(bias, torch.Tensor) else None


def _selection_score(router: nn.Module, args: tuple, kwargs: dict, logits_TE, indices_TK) -> torch.Tensor:
    """The score each chosen slot was picked by, gathered at the chosen slots (T, K)."""
    if router._phds_layout.width is not None:
        # A fixed-width router picks slot by slot (sampling while training): its slots are in the order picked.
        order_K = torch.arange(indices_TK.shape[-1], 0, -1, device=indices_TK.device, dtype=torch.float32)
        return order_K.expand(indices_TK.shape)
    logits_TE = logits_TE.float()
    bias = _choice_bias(router, args, kwargs)
    if bias is not None:
        return (logits_TE.sigmoid() + bias.float()).gather(-1, indices_TK)
    return logits_TE.gather(-1, indices_TK)  # softmax / sigmoid / logit routers are all monotone in the logits


def _drop_slots_hook(router: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple | None:
    plan: _Plan = router._phds_plan
    if _is_native(plan, router):
        return None
    layout: _Layout = router._phds_layout
    logits_TE, weights_TK, indices_TK = _read_routing(layout, output, router.top_k)
    if layout.width is not None and router.top_k > weights_TK.shape[-1]:
        weights_TK, indices_TK = _pick_slot_by_slot(
            logits_TE, weights_TK, indices_TK, router.top_k, _slot_threshold(router)
        )
    selection_TK = _selection_score(router, args, kwargs, logits_TE, indices_TK)
    num_tokens = weights_TK.shape[0]
    if isinstance(plan.k, (TopP, Skip)):
        k_T = _policy_counts(plan.k, logits_TE, indices_TK, weights_TK, selection_TK)
        _count_kept(router, k_T)
    elif isinstance(plan.k, torch.Tensor):
        k_T = expand_k_per_token(plan.k.to(indices_TK.device), num_tokens)
    else:
        k_T = torch.full((num_tokens,), plan.k, device=indices_TK.device)
    renormalize = router._phds_renormalizes if plan.renormalize is None else plan.renormalize
    new_weights = keep_top_slots(weights_TK, selection_TK, k_T, renormalize=renormalize, epsilon=plan.epsilon)
    return _write_routing(layout, output, new_weights, indices_TK, drop_zero=plan.epsilon == 0.0)


def _policy_counts(policy, logits_TE, indices_TK, weights_TK, selection_TK) -> torch.Tensor:
    """Each token's k under `policy`, from the router's probabilities and weights in the router's rank order."""
    probs_TK = logits_TE.float().softmax(dim=-1).gather(-1, indices_TK)
    order_TK = selection_TK.argsort(dim=-1, descending=True, stable=True)
    return policy.counts(probs_TK.gather(-1, order_TK), weights_TK.float().gather(-1, order_TK))


def _count_kept(router: nn.Module, k_T: torch.Tensor) -> None:
    """Add this forward's kept experts and routed tokens (padding excluded when the mask is known)."""
    valid_T = torch.ones_like(k_T)
    holder = getattr(router, "_phds_token_mask_of", None)
    mask = holder.mask if holder is not None else None
    if mask is not None and k_T.numel() % mask.shape[0] == 0:
        new_positions = k_T.numel() // mask.shape[0]
        if new_positions <= mask.shape[1]:
            valid_T = mask[:, -new_positions:].reshape(-1).to(k_T.device, k_T.dtype)
    kept, tokens = (k_T * valid_T).sum(), valid_T.sum()
    if router._phds_kept is not None:
        kept, tokens = kept + router._phds_kept[0], tokens + router._phds_kept[1]
    router._phds_kept = (kept.detach(), tokens.detach())


def _is_native(plan: _Plan, router: nn.Module) -> bool:
    """True when setting the router's own top_k reproduces the plan exactly (the fast, hook-free path): an int k
    the router follows (a fixed-width router only at its width), no epsilon, no renormalisation override."""
    width = router._phds_layout.width
    return (
        isinstance(plan.k, int)
        and plan.epsilon == 0.0
        and (plan.renormalize is None or plan.renormalize == router._phds_renormalizes)
        and (width is None or plan.k == width)
    )


def _k_max(k: int | torch.Tensor | TopP | Skip, k_pre: int) -> int:
    """The most experts any token can use under `k` (a policy's `k_max` defaults to the layer's k_pre)."""
    if isinstance(k, (TopP, Skip)):
        return k.k_max if k.k_max is not None else k_pre
    return int(k.max()) if isinstance(k, torch.Tensor) else k


def _routed_k(plan: _Plan, router: nn.Module) -> int:
    """How many slots the router itself must pick for the hook to carve `plan` out of them (a fixed-width router
    picks its width whatever this says; the hook continues it beyond)."""
    k_pre = router._phds_k_pre
    if _is_native(plan, router):
        return plan.k
    k_max = _k_max(plan.k, k_pre)
    if plan.epsilon or plan.renormalize is not None:
        return max(k_max, k_pre)  # dropped experts keep an epsilon weight / the k_pre mass: route at k_pre
    return k_max


# ----------------------------------------------------------------------------- validation


def _most_experts(layers: list[MoELayer]) -> int:
    """The largest k every layer can give: its number of experts, or the width of a fixed-width router whose rule
    the dial cannot continue (one that does not pick slot by slot)."""
    limits = []
    for layer in layers:
        layout = layer.router._phds_layout
        fixed = layout.width is not None and not layout.slot_by_slot
        limits.append(layout.width if fixed else layer.num_experts)
    return min(limits)


def _check_int(k: object, what: str, layers: list[MoELayer]) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"`k` must be an integer number of experts per token, got {what}={k!r}")
    k = int(k)
    max_experts = _most_experts(layers)
    if not 1 <= k <= max_experts:
        raise ValueError(f"`k` must be between 1 and the number of experts ({max_experts}), got {what}={k}")
    return k


def _check_tensor(k: torch.Tensor, layers: list[MoELayer]) -> torch.Tensor:
    if k.dtype.is_floating_point or k.dtype.is_complex or k.dtype == torch.bool:
        raise ValueError(f"a tensor `k` must be an integer (Long) tensor, got dtype {k.dtype}")
    if k.dim() not in (1, 2) or k.numel() == 0:
        raise ValueError(
            f"a tensor `k` must have shape (batch,) for a k per row or (batch, seq) for a k per token, "
            f"got shape {tuple(k.shape)}"
        )
    max_experts = _most_experts(layers)
    low, high = int(k.min()), int(k.max())
    if low < 1 or high > max_experts:
        raise ValueError(
            f"every k in a tensor `k` must be between 1 and the number of experts ({max_experts}), "
            f"got values from {low} to {high}"
        )
    return k.to(torch.long)


def _check_policy(policy: TopP | Skip, what: str, layers: list[MoELayer]) -> TopP | Skip:
    max_experts = _most_experts(layers)
    if policy.k_max is not None and policy.k_max > max_experts:
        raise ValueError(
            f"`k_max` of a routing policy must be at most the number of experts ({max_experts}), got {what}={policy}"
        )
    return policy


def _check_value(k: object, what: str, layers: list[MoELayer]) -> int | TopP | Skip:
    return _check_policy(k, what, layers) if isinstance(k, (TopP, Skip)) else _check_int(k, what, layers)


def _plans_for(layers: list[MoELayer], k: KSpec, epsilon: float, renormalize: bool | None) -> dict[int, _Plan]:
    """Validate `k` completely and return the new plan of every layer; touches nothing."""
    if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or not 0.0 <= epsilon < 1.0:
        raise ValueError(f"`epsilon` must be a float in [0, 1), got {epsilon!r}")
    current = {id(layer.router): layer.router._phds_plan for layer in layers}
    if isinstance(k, torch.Tensor):
        k = _check_tensor(k, layers)
        return {id(layer.router): _Plan(k, float(epsilon), renormalize) for layer in layers}
    if isinstance(k, Mapping):
        by_index = {layer.index: layer for layer in layers}
        unknown = sorted(set(k) - set(by_index), key=str)
        if unknown:
            raise ValueError(
                f"per-layer `k` names layers {unknown} that are not MoE layers; MoE layers are {sorted(by_index)}"
            )
        plans = {}
        for layer in layers:
            old = current[id(layer.router)]
            if isinstance(old.k, torch.Tensor) and layer.index not in k:
                raise ValueError(
                    f"layer {layer.index} has a per-row/per-token k; give every layer an int k when switching to a dict"
                )
            value = _check_value(k[layer.index], f"k[{layer.index}]", [layer]) if layer.index in k else old.k
            plans[id(layer.router)] = _Plan(value, float(epsilon), renormalize)
        return plans
    value = _check_value(k, "k", layers)
    return {id(layer.router): _Plan(value, float(epsilon), renormalize) for layer in layers}


# ----------------------------------------------------------------------------- the API


def _apply(model: nn.Module, layers: list[MoELayer], plans: dict[int, _Plan]) -> None:
    for layer in layers:
        plan = plans[id(layer.router)]
        layer.router._phds_plan = plan
        layer.router._phds_kept = None
        layer.router.top_k = min(_routed_k(plan, layer.router), layer.num_experts)
        for module in layer.top_k_copies:
            module.top_k = layer.router.top_k
    _sync_config(model, layers)


def _sync_config(model: nn.Module, layers: list[MoELayer]) -> None:
    """Keep `num_experts_per_tok` (config and any copy on a module) equal to the routed k, so the load-balancing
    loss and anything else reading it sees the dialled k. Per-layer ks differ: the largest is written."""
    routed = max(layer.router.top_k for layer in layers)
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "num_experts_per_tok"):
            configs[id(config)] = config
        text_config = getattr(config, "text_config", None) if config is not None else None
        if text_config is not None and hasattr(text_config, "num_experts_per_tok"):
            configs[id(text_config)] = text_config
        if isinstance(module.__dict__.get("num_experts_per_tok"), int):
            module.num_experts_per_tok = routed
    for config in configs.values():
        config.num_experts_per_tok = routed


def set_k(model: nn.Module, k: KSpec, *, epsilon: float = 0.0, renormalize: bool | None = None) -> None:
    """Dial how many experts each token uses.

    Args:
        model: a loaded transformers MoE model.
        k: an int (same k in every MoE layer), a routing policy (`phds.TopP(tau)`, `phds.Skip(beta)`: a k per
            token from the router's own scores), a dict `{layer_index: int or policy}` (per layer; layers not named
            keep their k; JetMoE's attention and MLP experts of a decoder layer share its index), or a LongTensor
            `(batch,)` (k per row) / `(batch, seq)` (k per token). PhiMoE's router always picks 2 experts: other ks
            follow the rule in this module's docstring.
        epsilon: weight for dropped experts instead of 0 (they are then computed, as the paper's faithful
            reproduction does); 0 drops them.
        renormalize: override whether the kept top-k weights are rescaled to the full top-k mass; None follows the
            model's router.

    Raises:
        ValueError: bad k (named in the message); the model is left exactly as it was.

    Example: `phds.set_k(model, 2)`.
    """
    layers = moe_layers(model)
    plans = _plans_for(layers, k, epsilon, renormalize)
    _warn_above_k_pre(model, layers, plans)
    _apply(model, layers, plans)


def _warn_above_k_pre(model: nn.Module, layers: list[MoELayer], plans: dict[int, _Plan]) -> None:
    if getattr(model, "_phds_warned_above_k_pre", False):
        return
    for layer in layers:
        k_max = _k_max(plans[id(layer.router)].k, layer.k_pre)
        if k_max > layer.k_pre:
            warnings.warn(
                f"k={k_max} is above the pretrained k_pre={layer.k_pre}: a valid operating point, but the model was "
                "never trained to use that many experts per token",
                UserWarning,
                stacklevel=3,
            )
            model._phds_warned_above_k_pre = True
            return


def get_k(model: nn.Module) -> int | TopP | Skip | dict | torch.Tensor:
    """The current k: an int (or policy) when every layer uses the same, a `{layer_index: k}` dict when they differ,
    the tensor when a per-row/per-token k is set.

    Example: `phds.get_k(model)  # -> 8 on a freshly loaded OLMoE`.
    """
    layers = moe_layers(model)
    plans = [layer.router._phds_plan for layer in layers]
    for plan in plans:
        if isinstance(plan.k, torch.Tensor):
            return plan.k
    ks = {layer.index: plan.k for layer, plan in zip(layers, plans, strict=True)}
    values = set(ks.values())
    return values.pop() if len(values) == 1 else ks


def active_experts(model: nn.Module) -> dict[int, float | None]:
    """Mean routed experts per token of each MoE layer, `{layer_index: mean}`.

    Under a routing policy it is measured: the experts the policy kept, over every token routed since the policy
    was set (padding excluded when the forward had an `attention_mask`); None for a layer that has routed no token
    yet. Under an int k it is that k; under a per-row / per-token tensor, the mean of the tensor.

    Example: `phds.set_k(model, phds.TopP(0.7)); model(**batch); phds.active_experts(model)  # {0: 2.3, 1: 3.1}`.
    """
    per_router: dict[int, list[float | None]] = {}
    for layer in moe_layers(model):
        plan = layer.router._phds_plan
        if isinstance(plan.k, (TopP, Skip)):
            kept = layer.router._phds_kept
            mean = float(kept[0] / kept[1]) if kept is not None and float(kept[1]) > 0 else None
        elif isinstance(plan.k, torch.Tensor):
            mean = float(plan.k.float().mean())
        else:
            mean = float(plan.k)
        per_router.setdefault(layer.index, []).append(mean)
    # A decoder layer with two routed parts (JetMoE's attention and MLP) reports the mean of the two.
    return {
        index: None if None in means else sum(means) / len(means)  # type: ignore[arg-type]
        for index, means in per_router.items()
    }


def mean_active_experts(model: nn.Module) -> float | None:
    """`active_experts` averaged over the MoE layers; None while a policy layer has routed no token.

    Example: `phds.dial.mean_active_experts(model)  # 2.7`.
    """
    means = list(active_experts(model).values())
    return None if any(m is None for m in means) else sum(means) / len(means)


@contextlib.contextmanager
def sparsity(
    model: nn.Module, k: KSpec, *, epsilon: float = 0.0, renormalize: bool | None = None
) -> Iterator[nn.Module]:
    """Run a block at `k` and restore the previous setting on exit, also when the block raises.

    Example: `with phds.sparsity(model, 2): model.generate(**inputs)`.
    """
    layers = moe_layers(model)
    saved = {id(layer.router): layer.router._phds_plan for layer in layers}
    set_k(model, k, epsilon=epsilon, renormalize=renormalize)
    try:
        yield model
    finally:
        _apply(model, layers, saved)


def k_pre(model: nn.Module) -> int:
    """The pretrained k of the model (the largest over layers).

    Example: `phds.dial.k_pre(model)  # -> 8 for OLMoE-1B-7B`.
    """
    return max(layer.k_pre for layer in moe_layers(model))


def num_experts(model: nn.Module) -> int:
    """Number of routed experts per MoE layer (the smallest over layers).

    Example: `phds.dial.num_experts(model)  # -> 64 for OLMoE-1B-7B`.
    """
    return min(layer.num_experts for layer in moe_layers(model))


def _routed_expert_parameters(layer: MoELayer) -> int:
    """Parameters of the layer's routed experts: its experts module, or every stacked (3-D) expert module of the
    block when the experts are split (JetMoE's input and output projections)."""
    stacked = [
        child
        for name, child in layer.block.named_children()
        if child is not layer.router
        and "shared" not in name
        and any(p.dim() == 3 for p in _unwrap_adapters(child).parameters(recurse=False))
    ]
    modules = stacked if len(stacked) > 1 else [layer.experts]
    return sum(p.numel() for module in modules for p in module.parameters())


def active_parameters(model: nn.Module, k: float | Mapping[int, float]) -> float:
    """Parameters one token touches at `k`: everything except the routed experts it does not use.

    Args:
        k: experts per token in every MoE layer, or `{layer_index: mean experts per token}` (a per-layer dial or a
            policy's measured `active_experts`); an int k gives an int count.

    Example: `phds.dial.active_parameters(model, 2)`.
    """
    layers = moe_layers(model)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0.0
    for layer in layers:
        per_expert = _routed_expert_parameters(layer) // layer.num_experts
        layer_k = k[layer.index] if isinstance(k, Mapping) else k
        inactive += per_expert * (layer.num_experts - min(layer_k, layer.num_experts))
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and embeddings is not None and head.weight is embeddings.weight
    if embeddings is not None and not tied:
        # A token reads one row of the input embedding, not the whole table.
        inactive += embeddings.weight.numel() - embeddings.weight.shape[1]
    active = total - inactive
    return int(active) if float(active).is_integer() and not isinstance(k, Mapping) else active
