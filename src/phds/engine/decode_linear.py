"""Linear layers for decode-sized inputs (a few rows) on the CPU at memory bandwidth: a decode step's main cost.

For one input row torch's CPU `linear` runs a gemv kernel on one core at about a third of the machine's memory
bandwidth (the olmoe-shape-small benchmark model, 2 cores: 15.5 GB/s where summing a large tensor reads 48), and for 2-64 rows its
gemm is no faster. The same product written as a batched matmul over a few blocks of the weight's rows,
`bmm(W as (blocks, O/blocks, D), x^T)`, takes another path: 2-4x at 1-8 rows, 1.1-1.5x at 16-64
(`benchmarks/bench_decode_linear.py`), equal up to summation order.

In bfloat16 / float16 the opposite holds: torch's linear (oneDNN) is 4-5x faster than the blocked product at one
row of a 2048 x 2048 weight (0.37 against 1.65 ms, bf16, 1 thread), so only float32
weights take it. Under `torch.compile` the blocked product is decomposed by Inductor into a multiply-and-sum over
the weight, which runs near bandwidth in every dtype (see the engine's `COMPILE_OPTIONS`).

`linear` is that product; `decode_linears(model)` makes every `nn.Linear` of a model use it (the engine holds it
while it decodes, as it holds the dial). More rows (prefill), autograd and other devices take `F.linear`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

# Row blocks of the weight, each one matmul of the batch: two or more leave the gemv kernel; four measured best.
_BLOCKS = (4, 2)
# Most input rows taken through the blocked product (measured faster up to 64; prefill keeps torch's gemm).
MAX_ROWS = 64


def linear(x_nD: torch.Tensor, weight_OD: torch.Tensor, bias_O: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, as a blocked batched matmul when `x` has at most `MAX_ROWS` rows, on the CPU,
    without autograd.

    Example: `linear(torch.randn(1, 512), torch.randn(1024, 512))  # (1, 1024)`.
    """
    out_dim, in_dim = weight_OD.shape
    rows = x_nD.numel() // in_dim if in_dim else 0
    blocks = next((b for b in _BLOCKS if out_dim % b == 0), None)
    if (
        not 1 <= rows <= MAX_ROWS
        or blocks is None
        or x_nD.device.type != "cpu"
        or (weight_OD.dtype != torch.float32 and not torch.compiler.is_compiling())
        or not weight_OD.is_contiguous()
        or (torch.is_grad_enabled() and (x_nD.requires_grad or weight_OD.requires_grad))
    ):
        return F.linear(x_nD, weight_OD, bias_O)
    # The input transposed, strides (1, D): a (D, 1) column with strides (1, 1) sends bmm down a path 5x slower.
    x_DN = x_nD.reshape(rows, in_dim).t()
    out_BON = torch.bmm(weight_OD.view(blocks, out_dim // blocks, in_dim), x_DN.expand(blocks, in_dim, rows))
    # A view for one row, a small copy for more: contiguous either way (Llama 4's rotary embedding views its queries
    # as complex numbers, which needs the last dimension dense).
    out = out_BON.permute(2, 0, 1).reshape(*x_nD.shape[:-1], out_dim).contiguous()
    return out if bias_O is None else out + bias_O


class DecodeLinear(nn.Linear):
    """An `nn.Linear` whose forward is `linear` (same parameters and state dict; swapped in by class)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear(input, self.weight, self.bias)


@contextlib.contextmanager
def decode_linears(model: nn.Module):
    """Within the block every plain `nn.Linear` of `model` on the CPU is a `DecodeLinear`; restored on exit.

    Example: `with decode_linears(model): model(input_ids=ids[:, -1:], past_key_values=cache)`.
    """
    swapped = [
        module for module in model.modules() if type(module) is nn.Linear and module.weight.device.type == "cpu"
    ]
    for module in swapped:
        module.__class__ = DecodeLinear
    try:
        yield
    finally:
        for module in swapped:
            module.__class__ = nn.Linear
