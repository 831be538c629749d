"""The experts kernel alone: one experts layer of the `olmoe-shape-small` preset, "phds" vs transformers' grouped_mm.

One layer (64 experts, hidden 512, expert intermediate 512, fp32), 512 tokens routed uniformly at random to k
experts, forward + backward (training) and forward only (prefill), at int k = 1 and 8 (nothing dropped: both
compute the same pairs with the same grouped-matmul kernel). The two implementations alternate call by call and
swap places every round. This isolates the kernel from the rest of a training step, whose timings on this
machine swing by 2x from run to run.

Run: `python benchmarks/bench_experts_layer.py [--threads 1] [--repeats 9]` (about a minute).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers.integrations.moe import grouped_mm_experts_forward

import phds
from phds.bench import PRESETS
from phds.engine.experts import phds_experts_forward

IMPLEMENTATIONS = {"phds": phds_experts_forward, "grouped_mm": grouped_mm_experts_forward}


def one_call(function, experts, hidden, index, weights, backward: bool) -> float:
    start = time.perf_counter()
    if backward:
        function(experts, hidden, index, weights).sum().backward()
        experts.zero_grad(set_to_none=False)  # freeing gradients every call adds page-fault noise
    else:
        with torch.inference_mode():
            function(experts, hidden, index, weights)
    return time.perf_counter() - start


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    family, fields = PRESETS["olmoe-shape-small"]
    experts = phds.moe_layers(phds.tiny_model(family, **{**fields, "num_hidden_layers": 1}))[0].experts
    generator = torch.Generator().manual_seed(0)
    print(f"{torch.get_num_threads()} torch threads, {args.tokens} tokens, medians of {args.repeats}")
    print("| pass | k | phds ms | grouped_mm ms | grouped_mm / phds |")
    print("|---|---|---|---|---|")
    for backward in (True, False):
        for k in (1, 8):
            hidden = torch.randn(args.tokens, experts.gate_up_proj.shape[-1], generator=generator)
            hidden.requires_grad_(backward)
            index = torch.stack([torch.randperm(experts.num_experts, generator=generator)[:k] for _ in hidden])
            weights = torch.rand(args.tokens, k, generator=generator)
            times = {name: [] for name in IMPLEMENTATIONS}
            for round_ in range(args.repeats + 1):  # the first round warms up
                names = list(IMPLEMENTATIONS) if round_ % 2 == 0 else list(IMPLEMENTATIONS)[::-1]
                for name in names:
                    seconds = one_call(IMPLEMENTATIONS[name], experts, hidden, index, weights, backward)
                    if round_:
                        times[name].append(seconds * 1e3)
            ours, stock = (statistics.median(times[name]) for name in IMPLEMENTATIONS)
            print(f"| {'fwd+bwd' if backward else 'fwd'} | {k} | {ours:.1f} | {stock:.1f} | {stock / ours:.2f}x |")
