"""The "phds" experts implementation: compute only the (token, expert) pairs whose routing weight is non-zero.

Shape suffixes: T tokens, K routed slots per token (the router's top-k), P kept (token, expert) pairs, D hidden,
I expert intermediate, E experts.

The dial hands per-row / per-token k to the experts as a top-`k_max` routing whose dropped slots weigh exactly 0.
Stock implementations (eager, grouped_mm, batched_mm) compute those slots and multiply them by 0; this one drops
them before any matmul, so a row at k=1 in a k_max=8 batch costs one expert, not eight. Slots with an epsilon
weight (the dial's "faithful" mode) are non-zero and are computed.

Kept pairs are sorted by expert and run as one grouped matmul over the stacked weights (no weight copy, no Python
loop over experts), with autograd, so training at a low k is proportionally cheaper too. Without autograd and with
at most ~4 pairs per expert (decode batches, short prompts at a low k), each hit expert simply runs on its tokens
through `decode_linear` (a bandwidth-bound small matmul): fewer ops than the grouped kernel's bookkeeping, which
visits every expert, and a faster kernel than its per-expert matmuls (1.3-3.2x per layer, see
`_few_tokens_is_faster`). Under `torch.compile` nothing needs preparing: one token's experts are gathered by index
inside the graph, and a batch runs every slot through the grouped kernel (fixed shapes: one full graph, no recompile
when a sequence gets shorter); `prepare_compile` makes a batch's inference path an opaque op that computes only the
kept pairs instead, for the mixed-k engine.

Registered in transformers' experts interface when `phds.engine` is imported:
`model.set_experts_implementation("phds")` or `phds.load(..., experts_implementation="phds")`.
"""

from __future__ import annotations

import inspect
import weakref

import torch
from transformers.integrations import moe as hf_moe
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from phds.engine import decode_linear

IMPLEMENTATION = "phds"


def _up_weights(experts: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if experts.has_gate:
        return experts.gate_up_proj, (experts.gate_up_proj_bias if experts.has_bias else None)
    return experts.up_proj, (experts.up_proj_bias if experts.has_bias else None)


def _activate(experts: torch.nn.Module, up_PI: torch.Tensor) -> torch.Tensor:
    return experts._apply_gate(up_PI) if experts.has_gate else experts.act_fn(up_PI)


def _grouped_linear(x_PD: torch.Tensor, weight_EXY: torch.Tensor, offsets_E: torch.Tensor, transposed: bool):
    """Rows of `x_PD` sorted by expert times their expert's weight; `offsets_E` are cumulative row counts."""
    weight = weight_EXY if transposed else weight_EXY.transpose(-2, -1)
    # transformers' dispatcher: torch's grouped_mm kernel where the device/dtype has one, else its looped
    # fallback op (both with autograd).
    return hf_moe._grouped_mm(x_PD.contiguous(), weight, offs=offsets_E)


def _pairs_grouped(experts, x_PD, expert_P, num_experts: int) -> torch.Tensor:
    """Expert outputs for pairs sorted by expert, via two grouped matmuls."""
    # histc, not bincount: its output has a fixed size, so torch.compile traces it in a full graph (float input:
    # histc has no integer kernel on CPU; expert ids are small integers, exact in float)
    counts_E = torch.histc(expert_P.float(), bins=num_experts, min=0, max=num_experts - 1)
    offsets_E = torch.cumsum(counts_E, dim=0).to(torch.int32)
    up_weight, up_bias = _up_weights(experts)
    up_PI = _grouped_linear(x_PD, up_weight, offsets_E, experts.is_transposed)
    if up_bias is not None:
        up_PI = up_PI + up_bias[expert_P]
    h_PI = _activate(experts, up_PI)
    out_PD = _grouped_linear(h_PI, experts.down_proj, offsets_E, experts.is_transposed)
    if experts.has_bias:
        out_PD = out_PD + experts.down_proj_bias[expert_P]
    return out_PD


def _expert_mlp(experts, x_nD: torch.Tensor, e: int) -> torch.Tensor:
    """Expert `e` applied to a few rows (no gather of its weights: a view of the stacked parameter)."""
    up_weight, up_bias = _up_weights(experts)
    up = x_nD @ up_weight[e] if experts.is_transposed else decode_linear.linear(x_nD, up_weight[e])
    if up_bias is not None:
        up = up + up_bias[e]
    h = _activate(experts, up)
    out = h @ experts.down_proj[e] if experts.is_transposed else decode_linear.linear(h, experts.down_proj[e])
    if experts.has_bias:
        out = out + experts.down_proj_bias[e]
    if experts.has_post_expert_norm:
        out = experts.post_expert_norm(out)
    return out


def _few_tokens(experts, hidden_TD: torch.Tensor, expert_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Few pairs per expert, no autograd: run each hit expert once on its tokens and add it in, weighted. About
    six tensor ops per hit expert and none per dropped slot or idle expert, where the grouped kernel visits every
    expert and its sort/scatter bookkeeping costs more than a k=1 expert itself."""
    tokens_by_expert: dict[int, list[tuple[int, float]]] = {}
    for token, (row_experts, row_weights) in enumerate(zip(expert_TK.tolist(), weights_TK.tolist(), strict=True)):
        for e, w in zip(row_experts, row_weights, strict=True):
            if w != 0.0:
                tokens_by_expert.setdefault(e, []).append((token, w))
    out_TD = hidden_TD.new_zeros(hidden_TD.shape)
    for e, pairs in tokens_by_expert.items():
        if len(pairs) == 1:
            ((token, w),) = pairs
            out_TD[token].add_(_expert_mlp(experts, hidden_TD[token : token + 1], e)[0], alpha=w)
            continue
        token_n = torch.tensor([token for token, _ in pairs], device=hidden_TD.device)
        weight_n1 = torch.tensor([[w] for _, w in pairs], dtype=hidden_TD.dtype, device=hidden_TD.device)
        out_TD.index_add_(0, token_n, _expert_mlp(experts, hidden_TD[token_n], e) * weight_n1)
    return out_TD


def _gathered_matvec(weight_KOI: torch.Tensor, x_nI: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Row k of the result is weight k times x's row k (or its only row): (K, O, I) x (K or 1, I) -> (K, O); for
    transposed weights (K, I, O)."""
    if transposed:
        return (weight_KOI * x_nI[:, :, None]).sum(dim=1)
    return (weight_KOI * x_nI[:, None, :]).sum(dim=-1)


def _one_token_gathered(experts, x_1D: torch.Tensor, expert_K: torch.Tensor, weight_K: torch.Tensor) -> torch.Tensor:
    """One token under `torch.compile`: gather the chosen experts' weights by index (gpt-fast's MoE layer) and
    multiply-and-sum, which Inductor fuses into one pass over those weights (no copy of them, no Python per expert).
    Replacing the opaque op at one token took the compiled engine on the olmoe-shape-small benchmark model from 3.17 to 2.62 ms a step at
    k=1 and from 9.38 to 6.13 at k=8 (`benchmarks/bench_compile.py`). Every slot is computed;
    at one token the dial's k is the router's top-k, so no slot weighs 0 unless the model is dialled per row."""
    up_weight, up_bias = _up_weights(experts)
    up_KX = _gathered_matvec(up_weight[expert_K], x_1D, experts.is_transposed)
    if up_bias is not None:
        up_KX = up_KX + up_bias[expert_K]
    h_KI = _activate(experts, up_KX)
    out_KD = _gathered_matvec(experts.down_proj[expert_K], h_KI, experts.is_transposed)
    if experts.has_bias:
        out_KD = out_KD + experts.down_proj_bias[expert_K]
    if experts.has_post_expert_norm:
        out_KD = experts.post_expert_norm(out_KD)
    return (out_KD * weight_K[:, None].to(out_KD.dtype)).sum(dim=0, keepdim=True).to(x_1D.dtype)


# Experts modules the compiled experts op can reach, by id (a custom op takes tensors and numbers, not modules).
_EXPERTS_BY_ID: weakref.WeakValueDictionary[int, torch.nn.Module] = weakref.WeakValueDictionary()


@torch.library.custom_op("phds::sparse_experts", mutates_args=())
def _sparse_experts_op(
    hidden_TD: torch.Tensor, expert_TK: torch.Tensor, weights_TK: torch.Tensor, experts_id: int
) -> torch.Tensor:
    """The inference forward as one opaque op for `torch.compile`: traced, its choice of experts would break the
    graph (`nonzero`) or specialise it on the routing it reads (a recompile per set of chosen experts)."""
    experts = _EXPERTS_BY_ID.get(experts_id)
    if experts is None:
        raise RuntimeError("compiling a model with the phds experts: call `prepare_compile(model)` first")
    return _sparse_forward(experts, hidden_TD, expert_TK, weights_TK, grad=False)


@_sparse_experts_op.register_fake
def _(hidden_TD, expert_TK, weights_TK, experts_id):
    return torch.empty_like(hidden_TD)


def prepare_compile(model: torch.nn.Module) -> None:
    """Optional, for the mixed-k engine: make a compiled inference forward skip dropped slots in batches too. A
    batch's experts then become an opaque op that finds its module by id and computes only the kept pairs; without
    this, a compiled batch computes every slot (a fixed-shape graph, dropped slots weighted 0). One token's experts
    are gathered inside the graph either way.

    Example: `prepare_compile(model); step = torch.compile(model.forward, dynamic=True)`.
    """
    for module in model.modules():
        if hasattr(module, "_is_expert_parallel") and hasattr(module, "is_concatenated"):  # transformers' interface
            _EXPERTS_BY_ID[id(module)] = module
            module._phds_opaque_when_compiled = True


def _few_tokens_is_faster(num_tokens: int, num_slots: int, num_experts: int) -> bool:
    # Measured on one layer of the olmoe-shape-small benchmark model (64 experts, 2 threads), per-expert calls through decode_linear
    # against the grouped kernel: 3.2x faster at 8 tokens x k=1, 1.8x at 8 x 8, 1.3x at 32 x 8 and 128 x 2 (256
    # pairs, 4 per expert), a tie at 64 x 8 and 0.8x at 128 x 8.
    return num_tokens * num_slots <= 4 * num_experts


def phds_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers experts-interface function: `(experts, hidden (T, D), index (T, K), weights (T, K)) -> (T, D)`.

    Equal to the eager experts within fp tolerance, forward and backward, for every family `phds.tiny.FAMILIES`
    covers; slots with weight exactly 0 are neither computed nor differentiated (their weight gradient would be
    blocked by the dial's mask anyway).

    Example: `model.set_experts_implementation("phds")` after `import phds.engine`.
    """
    num_tokens = hidden_states.shape[0]
    num_slots = top_k_index.shape[-1]
    expert_TK = top_k_index.reshape(num_tokens, num_slots)
    weights_TK = top_k_weights.reshape(num_tokens, num_slots)
    grad = torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad)
    if torch.compiler.is_compiling():
        if not grad and num_tokens == 1 and not self._is_expert_parallel:
            return _one_token_gathered(self, hidden_states, expert_TK[0], weights_TK[0])
        if not grad and getattr(self, "_phds_opaque_when_compiled", False):
            return torch.ops.phds.sparse_experts(hidden_states, expert_TK, weights_TK, id(self))
        return _all_slots(self, hidden_states, expert_TK, weights_TK)
    return _sparse_forward(self, hidden_states, expert_TK, weights_TK, grad)


def _all_slots(self, hidden_TD: torch.Tensor, expert_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Every slot of every token through the grouped kernel, dropped ones weighted 0: no data-dependent shape, so
    a compiled forward is one full graph and a shorter sequence needs no new one (what the stock grouped_mm
    implementation does; the eager path computes only the kept pairs)."""
    num_tokens, hidden_dim = hidden_TD.shape
    num_slots = expert_TK.shape[-1]
    expert_P, slot_P = torch.sort(expert_TK.reshape(-1), stable=True)
    token_P = torch.div(slot_P, num_slots, rounding_mode="floor")
    y_PD = _pairs_grouped(self, hidden_TD[token_P], expert_P, self.num_experts)
    if self.has_post_expert_norm:
        y_PD = self.post_expert_norm(y_PD)
    # slots of experts on other ranks (expert parallelism) are past the grouped kernel's last group: weight 0
    weight_P = torch.where(expert_P < self.num_experts, weights_TK.reshape(-1)[slot_P], 0.0)
    y_PD = torch.where(weight_P[:, None] != 0, y_PD * weight_P[:, None].to(y_PD.dtype), 0.0)
    slots_TKD = hidden_TD.new_zeros(num_tokens * num_slots, hidden_dim).index_copy(0, slot_P, y_PD.to(hidden_TD.dtype))
    return slots_TKD.view(num_tokens, num_slots, hidden_dim).sum(dim=1)


def _sparse_forward(
    self, hidden_states: torch.Tensor, expert_TK: torch.Tensor, weights_TK: torch.Tensor, grad: bool
) -> torch.Tensor:
    """The kept pairs, per expert for a few pairs without autograd, else through the grouped kernel."""
    num_tokens, hidden_dim = hidden_states.shape
    num_slots = expert_TK.shape[-1]
    if not grad and not self._is_expert_parallel and _few_tokens_is_faster(num_tokens, num_slots, self.num_experts):
        return _few_tokens(self, hidden_states, expert_TK, weights_TK)
    with torch.no_grad():
        keep_TK = weights_TK != 0
        if self._is_expert_parallel:
            keep_TK &= expert_TK < self.num_experts
        slot_P = keep_TK.reshape(-1).nonzero().squeeze(-1)
        expert_P, order_P = torch.sort(expert_TK.reshape(-1)[slot_P], stable=True)
        slot_P = slot_P[order_P]
        token_P = torch.div(slot_P, num_slots, rounding_mode="floor")
    if slot_P.numel() == 0:
        return hidden_states.new_zeros(num_tokens, hidden_dim)
    y_PD = _pairs_grouped(self, hidden_states[token_P], expert_P, self.num_experts)
    if self.has_post_expert_norm:
        y_PD = self.post_expert_norm(y_PD)
    y_PD = y_PD * weights_TK.reshape(-1)[slot_P].unsqueeze(-1).to(y_PD.dtype)
    # Scatter into a (T*K, D) buffer and sum over K: deterministic, and unlike `index_add` (which the eager
    # experts use) it has no parallel path that stalls for milliseconds when the other cores are busy.
    slots_TKD = hidden_states.new_zeros(num_tokens * num_slots, hidden_dim).index_copy_(
        0, slot_P, y_PD.to(hidden_states.dtype)
    )
    return slots_TKD.view(num_tokens, num_slots, hidden_dim).sum(dim=1)


# ----------------------------------------------------------------------------- experts outside the interface


def _is_prescaled_dense(module: torch.nn.Module) -> bool:
    """Stacked experts that take every expert's copy of the tokens already multiplied by its routing weight, one
    block of rows per expert, and return one block per expert (Llama 4's): a `gate_up_proj` (E, D, 2I) and a
    `down_proj` (E, I, D), no biases, a forward of the hidden states alone, outside transformers' interface."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3):
        return False
    num_experts, hidden, double_inner = gate_up.shape
    return (
        not hasattr(module, "_is_expert_parallel")
        and down.shape == (num_experts, double_inner // 2, hidden)
        and not any(name.endswith("bias") for name, _ in module.named_parameters(recurse=False))
        and len(inspect.signature(type(module).forward).parameters) == 2
    )


def _prescaled_dense_forward(self, hidden_ED: torch.Tensor) -> torch.Tensor:
    """The rows a zero weight scaled to 0 are not computed: without biases an expert maps 0 to 0, so a token runs
    through its routed experts only instead of through all of them (Llama 4's own experts run every expert on every
    token). Autograd and torch.compile use the module's own dense forward."""
    if (torch.is_grad_enabled() and hidden_ED.requires_grad) or torch.compiler.is_compiling():
        return type(self).forward(self, hidden_ED)
    num_experts, hidden = self.gate_up_proj.shape[0], self.gate_up_proj.shape[1]
    x_ETD = hidden_ED.view(num_experts, -1, hidden)
    hit_ET = x_ETD.ne(0).any(dim=-1)
    out_ETD = torch.zeros_like(x_ETD)
    for e in hit_ET.any(dim=-1).nonzero().flatten().tolist():
        rows_n = hit_ET[e].nonzero().flatten()
        gate_nI, up_nI = (x_ETD[e, rows_n] @ self.gate_up_proj[e]).chunk(2, dim=-1)
        out_ETD[e, rows_n] = (up_nI * self.act_fn(gate_nI)) @ self.down_proj[e]
    return out_ETD.view(-1, hidden)


def apply_to_other_experts(model: torch.nn.Module) -> bool:
    """Give "phds" to a model whose experts transformers' interface does not reach; False when it cannot.

    Pre-scaled dense experts (Llama 4) are switched to compute only their routed rows, each checked against its own
    forward on a probe (left alone if they differ). A model whose routers list the slots their experts compute
    (JetMoE) needs nothing: the dial lists only the kept ones. `restore_other_experts` undoes the switch.

    Example: `apply_to_other_experts(phds.tiny_model("llama4"))  # -> True`.
    """
    from phds import dial

    switched = 0
    for module in model.modules():
        if not _is_prescaled_dense(module):
            continue
        if "forward" in module.__dict__:
            switched += 1  # already switched
            continue
        num_experts, hidden = module.gate_up_proj.shape[:2]
        generator = torch.Generator().manual_seed(0)
        probe_ED = torch.randn(num_experts * 2, hidden, generator=generator).to(module.gate_up_proj)
        probe_ED.view(num_experts, 2, hidden)[::2, 1] = 0  # some rows routed away, as the router leaves them
        with torch.no_grad():
            expected = type(module).forward(module, probe_ED)
            got = _prescaled_dense_forward(module, probe_ED)
        if torch.allclose(got.float(), expected.float(), rtol=1e-3, atol=1e-3 * float(expected.abs().max()) + 1e-6):
            module.forward = _prescaled_dense_forward.__get__(module)
            switched += 1
    return switched > 0 or all(layer.lists_slots for layer in dial.moe_layers(model))


def restore_other_experts(model: torch.nn.Module, keep: set[int] | frozenset[int] = frozenset()) -> None:
    """Undo `apply_to_other_experts`, except on the modules whose `id` is in `keep`."""
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if id(module) not in keep and getattr(forward, "__func__", None) is _prescaled_dense_forward:
            del module.forward


def register() -> None:
    """Register "phds" in transformers' experts interface (idempotent).

    Example: `phds.engine.experts.register(); model.set_experts_implementation("phds")`.
    """
    if ExpertsInterface._global_mapping.get(IMPLEMENTATION) is not phds_experts_forward:
        ExpertsInterface.register(IMPLEMENTATION, phds_experts_forward)
    assert IMPLEMENTATION in ALL_EXPERTS_FUNCTIONS
