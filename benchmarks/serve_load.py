"""Load test of `phds serve` on loopback: N requests at mixed k, C at a time, against one-at-a-time in the same run.

Starts the server in this process (a real uvicorn server on a free loopback port), sends every request with the
official `openai` client (`ignore_eos`, so each request generates exactly --max-tokens tokens), first one at a time
(the baseline), then --concurrency at a time, and prints per k: requests, tokens/s and p50/p99 end-to-end latency,
plus the overall throughput ratio concurrent / one-at-a-time.

    python benchmarks/serve_load.py                                  # tiny:olmoe, 48 requests, 8 at a time
    python benchmarks/serve_load.py --model out/olmoe-phds --requests 64 --concurrency 16 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import defaultdict

import openai

from phds.cli.common import parse_ks
from phds.serving import ServeConfig, Service, background_server


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def run_phase(
    base_url: str, model: str, jobs: list[tuple[str, int]], concurrency: int, max_tokens: int, timeout_s: float
) -> tuple[float, dict[int, list[float]], dict[int, int]]:
    """Send `jobs` (prompt, k) with at most `concurrency` in flight; wall seconds, latencies and tokens per k."""
    gate = asyncio.Semaphore(concurrency)
    latencies: dict[int, list[float]] = defaultdict(list)
    tokens: dict[int, int] = defaultdict(int)
    async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=timeout_s) as client:

        async def one(prompt: str, k: int) -> None:
            async with gate:
                start = time.perf_counter()
                answer = await client.completions.create(
                    model=model,
                    prompt=prompt,
                    max_tokens=max_tokens,
                    temperature=0,
                    extra_body={"k": k, "ignore_eos": True},
                )
                latencies[k].append(time.perf_counter() - start)
                tokens[k] += answer.usage.completion_tokens

        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one(p, k) for p, k in jobs)), timeout_s)
        return time.perf_counter() - start, latencies, tokens


def report(title: str, wall_s: float, latencies: dict[int, list[float]], tokens: dict[int, int]) -> float:
    total = sum(tokens.values())
    print(
        f"\n{title}: {sum(len(v) for v in latencies.values())} requests, {total} tokens in {wall_s:.2f}s "
        f"= {total / wall_s:.1f} tok/s"
    )
    print(f"{'k':>3} {'requests':>9} {'tok/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9}")
    for k in sorted(latencies):
        ms = [s * 1000 for s in latencies[k]]
        print(
            f"{k:>3} {len(ms):>9} {tokens[k] / wall_s:>9.1f} {percentile(ms, 50):>9.1f} {percentile(ms, 99):>9.1f} "
            f"{statistics.mean(ms):>9.1f}"
        )
    return total / wall_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:olmoe")
    parser.add_argument("--ks", default="1,2,4", help="ks to mix, round-robin over the requests")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--timeout-s", type=float, default=600.0, help="bound on each phase")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    ks = parse_ks(args.ks, "--ks")

    config = ServeConfig(
        model=args.model,
        k_set=ks,
        port=0,
        max_batch=args.max_batch,
        max_queue=max(args.requests, 1),
        device=args.device,
    )
    service = Service.from_config(config)
    jobs = [(f"request {i}: " + "abcdefgh"[: 1 + i % 8], ks[i % len(ks)]) for i in range(args.requests)]
    with background_server(service, config) as base_url:
        warmup = [(p, k) for p, k in jobs[: len(ks)]]
        asyncio.run(run_phase(base_url, service.model_name, warmup, len(ks), 4, args.timeout_s))
        sequential = asyncio.run(run_phase(base_url, service.model_name, jobs, 1, args.max_tokens, args.timeout_s))
        mixed_before = service.runner.mixed_k_steps
        concurrent = asyncio.run(
            run_phase(base_url, service.model_name, jobs, args.concurrency, args.max_tokens, args.timeout_s)
        )
        mixed = service.runner.mixed_k_steps - mixed_before
    print(
        f"model {args.model}  ks {ks}  requests {args.requests}  max_tokens {args.max_tokens}  "
        f"max_batch {args.max_batch}  device {next(service.model.parameters()).device}"
    )
    base = report("one at a time (baseline)", *sequential)
    loaded = report(f"{args.concurrency} at a time, mixed k", *concurrent)
    print(
        f"\nthroughput concurrent / one-at-a-time: {loaded / base:.2f}x   "
        f"engine steps mixing several ks: {mixed}   peak running batch: {service.runner.peak_running}"
    )


if __name__ == "__main__":
    main()
