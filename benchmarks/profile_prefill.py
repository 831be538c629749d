"""Where a batch-1 prefill's time goes, the engine against stock transformers, on the real-scale model.

Times three 64-token prefills of each at one k (the engine's first step; stock: one forward with the cache), then
prints torch.profiler's top operators for one more. Used to bound the "prefill not slower than stock" goal in
docs/performance.md: both spend most of a prefill in torch's bf16 `mm` (the same calls: per-expert linears and the
attention projections).

Run: `python benchmarks/profile_prefill.py [--tiny-config olmoe-1b-7b-shape] [--k 2] [--threads 2]`.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from phds import dial
from phds.bench import BenchConfig, build_model
from phds.bench.measure import random_prompts
from phds.engine import Engine, Request, SamplingParams

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-config", default="olmoe-1b-7b-shape")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(BenchConfig(tiny_config=args.tiny_config))
    prompt = random_prompts(BenchConfig(prompt_len=args.prompt_len), 1, model.config.vocab_size)
    engine = Engine(model, max_batch_size=1, max_seq_len=args.prompt_len + 16)

    def engine_prefill():
        params = SamplingParams(max_new_tokens=1, ignore_eos=True)
        engine.add(Request(request_id="prefill", prompt_ids=prompt[0].tolist(), k=args.k, params=params))
        while engine.has_work():
            engine.step()

    def stock_prefill():
        model.set_experts_implementation("eager")
        with dial.sparsity(model, args.k), torch.inference_mode():
            model(prompt, use_cache=True, logits_to_keep=1)

    for name, run in (("engine", engine_prefill), ("stock eager", stock_prefill)):
        run()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        print(f"{name}: prefill ms {[round(t) for t in times]}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=50))
