"""Reproduce the decode / prefill / mixed-k figures of docs/performance.md (issue 7's OLMoE-shaped model, fp32).

Our engine ("phds" experts, slot KV cache, mixed-k batches) against stock transformers `generate()` with its
grouped_mm and eager experts, measured in the same run, with the bandwidth floor per k. Same as
`phds bench --k 1,2,4,8 --batch 1,8 --json benchmarks/results/decode.json`.

Run: `python benchmarks/bench_decode.py [--repeats 5] [--threads 2]` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from phds.cli.bench import _print
from phds.engine.benchmark import BenchConfig, bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode.json")
    args = parser.parse_args()
    config = BenchConfig(
        tiny_config="issue7",
        ks=[1, 2, 4, 8],
        batches=[1, 8],
        repeats=args.repeats,
        new_tokens=args.new_tokens,
        stock=["grouped_mm", "eager"],
        mixed=True,
        threads=args.threads,
    )
    results = bench(config, progress=lambda text: print(f"... {text}", flush=True))
    _print(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
