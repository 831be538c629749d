"""Reproduce the training-step figures of docs/performance.md: forward + backward at batch 4 x 128 per k with the
"phds" experts against stock transformers' default grouped_mm experts, in the same run.

Same as `phds bench --no-decode --no-mixed --train --k 1,2,4,8 --json benchmarks/results/train.json`.

Run: `python benchmarks/bench_train_experts.py [--repeats 3] [--threads 2]`.
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
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train.json")
    args = parser.parse_args()
    config = BenchConfig(
        tiny_config="issue7",
        ks=[1, 2, 4, 8],
        repeats=args.repeats,
        decode=False,
        mixed=False,
        train=True,
        train_batch=4,
        train_seq=128,
        threads=args.threads,
    )
    results = bench(config, progress=lambda text: print(f"... {text}", flush=True))
    _print(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
