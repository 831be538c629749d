"""Does `torch.compile` help decode on this machine? `Engine(compile=True)` against the eager engine, one run.

`compile=True` compiles the one-token decode forward with `torch.compile(dynamic=True)`. On CPU the point would
be to fuse the ~1,000 small tensor ops of a transformers decode step (the overhead `bench_overhead.py` measures),
so the default model is the overhead-only twin of issue 7's model (same 8 layers, 64 experts, heads and vocabulary;
hidden and expert sizes 64). Reports the time until the compiled engine's first decode step is done (compilation),
then the median decode ms/token of both engines alternating, and whether their greedy outputs are identical.

Run: `python benchmarks/bench_compile.py [--model issue7] [--threads 2]` (compiling takes several minutes).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from phds.engine import Engine
from phds.engine.benchmark import PRESETS, BenchConfig, build_model, engine_decode, random_prompts

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["overhead-only", "issue7"], default="overhead-only")
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    family, fields = PRESETS["issue7"]
    if args.model == "overhead-only":
        fields = {**fields, "hidden_size": 64, "intermediate_size": 64}
    tiny_config = f"{family}:" + ",".join(f"{key}={value}" for key, value in fields.items())
    model = build_model(BenchConfig(tiny_config=tiny_config))
    config = BenchConfig(prompt_len=64, new_tokens=32)
    engines = {
        "eager": Engine(model, max_batch_size=1, max_seq_len=128),
        "compiled": Engine(model, max_batch_size=1, max_seq_len=128, compile=True),
    }
    prompts = random_prompts(config, 1, model.config.vocab_size)
    start = time.perf_counter()
    engine_decode(engines["compiled"], prompts, [args.k], 3)
    print(f"{torch.get_num_threads()} torch threads, {args.model} model, k={args.k}")
    print(f"compiling (until the first decode steps are done): {time.perf_counter() - start:.0f} s")
    steps = {name: [] for name in engines}
    outputs = {name: [] for name in engines}
    for repeat in range(args.repeats):
        prompts = random_prompts(config, 1, model.config.vocab_size, offset=repeat)
        for name in list(engines) if repeat % 2 == 0 else list(engines)[::-1]:
            run = engine_decode(engines[name], prompts, [args.k], config.new_tokens)
            steps[name].append(run.step_s * 1e3)
            outputs[name].append(run.outputs)
    eager, compiled = (statistics.median(steps[name]) for name in engines)
    print(
        f"decode ms/token: eager engine {eager:.2f}, compiled engine {compiled:.2f}; compiled is {eager / compiled:.2f}x"
    )
    print(f"greedy outputs identical: {outputs['eager'] == outputs['compiled']}")
