"""Does `torch.compile` help decode on this machine? `Engine(compile=True)` against the eager engine, one run.

`compile=True` compiles the one-token decode forward with `torch.compile(dynamic=True)`; one token's experts are
gathered by index inside the graph, a batch's run as one opaque op (`phds.engine.experts.prepare_compile`). On CPU the gain is fusing the ~1,000
small tensor ops of a transformers decode step (the overhead `bench_overhead.py` measures), so the default model
is the overhead-only twin of the `olmoe-shape-small` preset (same 8 layers, 64 experts, heads and vocabulary;
hidden and expert sizes 64); `--model olmoe-shape-small` runs the real one. Reports the time until the compiled engine's first decode steps
are done (compilation), then the median decode ms/token of both engines alternating, and whether their greedy
outputs are identical.

Run: `python benchmarks/bench_compile.py [--model olmoe-shape-small] [--k 1] [--threads 2]` (compiling takes 4-16 s per k).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from phds.bench import BenchConfig, build_model
from phds.bench.measure import engine_decode, random_prompts
from phds.cli.common import parse_ks
from phds.engine import Engine

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["overhead-only", "olmoe-shape-small"], default="overhead-only")
    parser.add_argument("--k", default="1", help="experts per token, e.g. 1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = "olmoe-shape-small-overhead-only" if args.model == "overhead-only" else args.model
    model = build_model(BenchConfig(tiny_config=preset))
    config = BenchConfig(prompt_len=64, new_tokens=32)
    engines = {
        "eager": Engine(model, max_batch_size=1, max_seq_len=128),
        "compiled": Engine(model, max_batch_size=1, max_seq_len=128, compile=True),
    }
    print(f"{torch.get_num_threads()} torch threads, {args.model} model")
    for k in parse_ks(args.k):
        start = time.perf_counter()
        engine_decode(engines["compiled"], random_prompts(config, 1, model.config.vocab_size), [k], 3)
        compile_s = time.perf_counter() - start
        steps = {name: [] for name in engines}
        outputs = {name: [] for name in engines}
        for repeat in range(args.repeats):
            prompts = random_prompts(config, 1, model.config.vocab_size, offset=repeat)
            for name in list(engines) if repeat % 2 == 0 else list(engines)[::-1]:
                run = engine_decode(engines[name], prompts, [k], config.new_tokens)
                steps[name].append(run.step_s * 1e3)
                outputs[name].append(run.outputs)
        eager, compiled = (statistics.median(steps[name]) for name in engines)
        print(
            f"k={k}: compiling {compile_s:.0f} s; decode ms/token: eager engine {eager:.2f}, compiled engine"
            f" {compiled:.2f}; compiled is {eager / compiled:.2f}x; greedy outputs identical:"
            f" {outputs['eager'] == outputs['compiled']}"
        )
