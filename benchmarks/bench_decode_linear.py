"""Decode-sized linear layers: torch's `F.linear` against `phds.engine.decode_linear.linear` (a blocked batched
matmul) for 1, 8 and 64 input rows, on the weight shapes of the `olmoe-shape-small` preset, alternating in one run.

Each shape cycles through enough distinct weights (256 MB) that every call reads its weight from memory, as a
decode step does. Prints microseconds per call, GB/s and the ratio, next to the read bandwidth of summing a large
tensor (what `phds bench`'s floor uses).

With `--engine`, also the batch-1 engine on that model with the blocked product on and off (off: every
linear takes `F.linear`), alternating, per k.

Run: `python benchmarks/bench_decode_linear.py [--threads 2] [--engine]`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from phds.bench import BenchConfig, build_model
from phds.bench.measure import engine_decode, measure_bandwidth, random_prompts
from phds.engine import Engine, decode_linear

SHAPES = {  # (out, in) of the olmoe-shape-small preset: hidden 512, expert intermediate 512, vocabulary 8192
    "attention projection": (512, 512),
    "expert gate+up": (1024, 512),
    "expert down": (512, 512),
    "lm_head": (8192, 512),
}


def seconds_per_call(function, weights, x, calls: int) -> float:
    for weight in weights[:8]:
        function(x, weight)
    start = time.perf_counter()
    for i in range(calls):
        function(x, weights[i % len(weights)])
    return (time.perf_counter() - start) / calls


def engine_on_off(repeats: int) -> None:
    model = build_model(BenchConfig(tiny_config="olmoe-shape-small"))
    engine = Engine(model, max_batch_size=1, max_seq_len=128)
    config = BenchConfig(prompt_len=64, new_tokens=32)
    blocks = decode_linear._BLOCKS
    print("batch-1 engine decode, ms/token: F.linear everywhere vs the blocked product")
    for k in (1, 2, 4, 8):
        times: dict[bool, list[float]] = {False: [], True: []}
        outputs: dict[bool, list] = {False: [], True: []}
        for repeat in range(repeats):
            prompts = random_prompts(config, 1, model.config.vocab_size, offset=repeat)
            for blocked in (False, True) if repeat % 2 == 0 else (True, False):
                decode_linear._BLOCKS = blocks if blocked else ()
                run = engine_decode(engine, prompts, [k], config.new_tokens)
                times[blocked].append(run.step_s * 1e3)
                outputs[blocked].append(run.outputs)
        decode_linear._BLOCKS = blocks
        stock, ours = statistics.median(times[False]), statistics.median(times[True])
        print(
            f"k={k}: F.linear {stock:.2f}, blocked {ours:.2f}, speed-up {stock / ours:.2f}x, "
            f"greedy outputs identical: {outputs[False] == outputs[True]}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--engine", action="store_true", help="also A/B the batch-1 engine on the olmoe-shape-small preset"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} torch threads; summing 512 MB reads {measure_bandwidth() / 1e9:.1f} GB/s")
    print(f"{'weight':22} {'rows':>4} {'F.linear us':>12} {'GB/s':>6} {'blocked us':>11} {'GB/s':>6} {'speedup':>8}")
    with torch.no_grad():
        for rows in (1, 8, 64):
            for name, (out_dim, in_dim) in SHAPES.items():
                weights = [torch.randn(out_dim, in_dim) for _ in range(max(8, 2**26 // (out_dim * in_dim)))]
                x = torch.randn(rows, in_dim)
                times = {F.linear: [], decode_linear.linear: []}
                for repeat in range(args.repeats):
                    for function in list(times) if repeat % 2 == 0 else list(times)[::-1]:
                        times[function].append(seconds_per_call(function, weights, x, args.calls))
                stock, ours = (statistics.median(times[function]) for function in times)
                size = out_dim * in_dim * 4
                print(
                    f"{name:22} {rows:4} {stock * 1e6:12.1f} {size / stock / 1e9:6.1f} {ours * 1e6:11.1f}"
                    f" {size / ours / 1e9:6.1f} {stock / ours:7.2f}x"
                )
    if args.engine:
        engine_on_off(args.repeats)
