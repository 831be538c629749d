"""One-row linear layers on the CPU at memory bandwidth: the batch-1 decode step's main cost.

For a single input row, torch's CPU `linear` runs a gemv kernel on one core at about a third of the machine's
memory bandwidth (issue 7's model, 2 cores: 15.5 GB/s where summing a large tensor reads 48). The same product
written as a batched matmul over a few blocks of the weight's rows takes torch's gemm path instead: 2x the speed
on one core and up to 4x on two (`benchmarks/bench_matvec.py`), with the same result up to summation order.

`linear` is that product; `matvec_linears(model)` makes every `nn.Linear` of a model use it for one-row inputs
(the engine holds it while it decodes, as it holds the dial). Rows > 1, autograd and other devices take
`F.linear` unchanged.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

# Row blocks of the weight, each one matmul of the batch: two or more leave the gemv kernel; four measured best.
_BLOCKS = (4, 2)


def linear(x_nD: torch.Tensor, weight_OD: torch.Tensor, bias_O: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, as a blocked batched matmul when `x` holds one row on the CPU without autograd.

    Example: `linear(torch.randn(1, 512), torch.randn(1024, 512))  # (1, 1024)`.
    """
    out_dim, in_dim = weight_OD.shape
    rows = x_nD.numel() // in_dim if in_dim else 0
    blocks = next((b for b in _BLOCKS if out_dim % b == 0), None)
    if (
        rows != 1
        or blocks is None
        or x_nD.device.type != "cpu"
        or not weight_OD.is_contiguous()
        or (torch.is_grad_enabled() and (x_nD.requires_grad or weight_OD.requires_grad))
    ):
        return F.linear(x_nD, weight_OD, bias_O)
    # A transposed row, strides (1, D): a (D, 1) tensor with strides (1, 1) sends bmm down a path 5x slower.
    column_D1 = x_nD.reshape(1, in_dim).t()
    out = torch.bmm(weight_OD.view(blocks, out_dim // blocks, in_dim), column_D1.expand(blocks, in_dim, 1))
    out = out.view(*x_nD.shape[:-1], out_dim)
    return out if bias_O is None else out + bias_O


class MatvecLinear(nn.Linear):
    """An `nn.Linear` whose one-row forward is `linear` (same parameters and state dict; swapped in by class)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear(input, self.weight, self.bias)


@contextlib.contextmanager
def matvec_linears(model: nn.Module):
    """Within the block every plain `nn.Linear` of `model` on the CPU is a `MatvecLinear`; restored on exit.

    Example: `with matvec_linears(model): model(input_ids=ids[:, -1:], past_key_values=cache)`.
    """
    swapped = [
        module for module in model.modules() if type(module) is nn.Linear and module.weight.device.type == "cpu"
    ]
    for module in swapped:
        module.__class__ = MatvecLinear
    try:
        yield
    finally:
        for module in swapped:
            module.__class__ = nn.Linear
