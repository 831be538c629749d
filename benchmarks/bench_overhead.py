"""How much of a batch-1 decode step is per-op overhead rather than weight reads?

Decodes, in one run, with the engine at each k: the OLMoE-shaped `olmoe-shape-small` preset and its
overhead-only twin (`olmoe-shape-small-overhead-only`), the same 8 layers, 64 experts, heads, vocabulary and k, with hidden and expert sizes cut to 64
so its weights are negligible (about 1/60 of the bytes). The twin's step time is what the modelling code's ~1,000
tensor ops per step cost by themselves; its share of the full model's step is the part of decode no experts
implementation can remove.

Run: `python benchmarks/bench_overhead.py [--threads 2] [--repeats 5]` (about a minute).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from phds.bench import BenchConfig, build_model
from phds.bench.measure import engine_decode, floor_seconds, measure_bandwidth, random_prompts
from phds.engine import Engine

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "overhead.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {
        "full": build_model(BenchConfig(tiny_config="olmoe-shape-small")),
        "overhead-only": build_model(BenchConfig(tiny_config="olmoe-shape-small-overhead-only")),
    }
    engines = {name: Engine(model, max_batch_size=1, max_seq_len=128) for name, model in models.items()}
    bandwidth = measure_bandwidth()
    config = BenchConfig(prompt_len=64, new_tokens=32)
    results = {"threads": torch.get_num_threads(), "bandwidth_GBps": bandwidth / 1e9, "rows": []}
    print(f"{torch.get_num_threads()} torch threads, measured read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("| k | olmoe-shape-small ms/token | overhead-only ms/token | overhead share | olmoe-shape-small floor ms |")
    print("|---|---|---|---|---|")
    for k in (1, 2, 4, 8):
        steps = {name: [] for name in engines}
        for repeat in range(args.repeats):  # the two models alternate, so load drift hits both alike
            prompts = random_prompts(config, 1, models["full"].config.vocab_size, offset=repeat)
            for name, engine in engines.items():
                steps[name].append(engine_decode(engine, prompts, [k], config.new_tokens).step_s * 1e3)
        full, bare = (sorted(steps[name])[len(steps[name]) // 2] for name in engines)
        floor = floor_seconds(models["full"], k, bandwidth) * 1e3
        results["rows"].append({"k": k, "full_ms": full, "overhead_only_ms": bare, "share": bare / full})
        print(f"| {k} | {full:.2f} | {bare:.2f} | {bare / full:.2f} | {floor:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
