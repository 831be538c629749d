"""Prefill, engine against stock grouped_mm `generate()`, alternating in one run, with the minor page faults each
takes: on a VM a prefill can spend 10-30% of its time faulting in memory glibc handed back to the OS.

Run it twice to see the effect (the second tells glibc to keep freed memory):

    python benchmarks/bench_prefill.py --threads 2
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=100000000000 python benchmarks/bench_prefill.py --threads 2
"""

from __future__ import annotations

import argparse
import resource
import statistics

import torch

from phds.bench import BenchConfig, build_model
from phds.bench.measure import engine_decode, random_prompts, stock_decode
from phds.cli.common import parse_ks
from phds.engine import Engine


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", default="1,8")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(BenchConfig(tiny_config="olmoe-shape-small"))
    engine = Engine(model, max_batch_size=args.batch, max_seq_len=args.prompt_len + 2)
    config = BenchConfig(prompt_len=args.prompt_len, new_tokens=2)
    print(f"{torch.get_num_threads()} torch threads, batch {args.batch} x {args.prompt_len} prompt tokens")
    for k in parse_ks(args.k):
        seconds: dict[str, list[float]] = {"engine": [], "stock": []}
        faults: dict[str, list[int]] = {"engine": [], "stock": []}
        for repeat in range(args.repeats):
            prompts = random_prompts(config, args.batch, model.config.vocab_size, offset=repeat)
            for name in ("engine", "stock") if repeat % 2 else ("stock", "engine"):
                before = minor_faults()
                if name == "engine":
                    seconds[name].append(engine_decode(engine, prompts, [k] * args.batch, 1).prefill_s)
                else:
                    seconds[name].append(stock_decode(model, prompts, k, "grouped_mm", 1)[0])
                faults[name].append(minor_faults() - before)
        ms = {name: statistics.median(values) * 1e3 for name, values in seconds.items()}
        print(
            f"k={k}: engine {ms['engine']:.1f} ms ({statistics.median(faults['engine']):.0f} page faults), "
            f"stock grouped_mm {ms['stock']:.1f} ms ({statistics.median(faults['stock']):.0f} page faults); "
            f"engine is {ms['stock'] / ms['engine']:.2f}x"
        )
