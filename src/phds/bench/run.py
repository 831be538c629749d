"""`bench`: decode and prefill speed per k, our engine against stock transformers in the same run.

Every figure is a median over repeated measurements (the machine is shared and noisy). For each k it reports
- decode ms/token at each batch size: the engine (the "phds" experts) and stock `generate()` with each requested
  stock experts implementation, timed per step with a logits processor;
- the bandwidth floor at batch 1: bytes of the weights one token touches at k (`phds.dial.active_parameters`)
  divided by the memory bandwidth measured in the same run (a large tensor sum), and stock / floor: the speed-up
  an engine running at the floor would have;
- prefill tokens/s for the engine and stock;
- optionally a training step (forward + backward) with the "phds" experts against stock grouped_mm;
and one mixed-k row: requests at k = 1, 1, 2, 2, 4, 4, 8, 8 decoded as one batch against the same requests one
after another, with their outputs compared and the speed-up the bandwidth floors allow.

The results are figures only; the project's targets for them live in `phds.bench.targets`.

Shape suffixes: B rows, S sequence positions.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from phds import dial
from phds.bench.config import BenchConfig, build_model
from phds.bench.measure import (
    EngineRun,
    batch_floor_seconds,
    distinct_experts_per_step,
    engine_decode,
    floor_seconds,
    measure_bandwidth,
    median,
    random_prompts,
    stock_decode,
    train_step_seconds,
)
from phds.engine.engine import Engine
from phds.engine.experts import IMPLEMENTATION
from phds.sidecar import check_ks


def bench(config: BenchConfig, progress: Callable[[str], None] | None = None, model=None) -> dict:
    """Run every measurement of `config` and return the results (JSON-ready).

    Args:
        config: what to measure.
        progress: called with a short description before each measurement (the CLI drives a progress bar).
        model: the model `build_model(config)` returns, built already (to measure the same weights at several thread
            counts without building them again); None builds it.

    Example: `bench(BenchConfig(tiny_config="olmoe", ks=[1, 4], repeats=1))["decode"][0]["engine_ms"]`.
    """
    note = progress or (lambda text: None)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    note("building the model")
    start = time.perf_counter()
    built = model is None
    model = (build_model(config) if built else model).eval()
    build_s = time.perf_counter() - start if built else None
    # Linux reports the peak resident set in KiB: what building the model (and anything this process did before) took.
    peak_rss_GB = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    num_experts = dial.num_experts(model)
    check_ks(config.ks, num_experts=num_experts)
    note("measuring memory bandwidth")
    bandwidth = measure_bandwidth()
    saved_implementation = model.config._experts_implementation
    model.set_experts_implementation(IMPLEMENTATION)
    max_batch = max(config.batches + ([8] if config.mixed else []))
    engine = Engine(
        model, max_batch_size=max_batch, max_seq_len=config.prompt_len + config.new_tokens + 1, compile=config.compile
    )
    results: dict = {
        "config": asdict(config),
        "model": {
            "class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype),
            "num_experts": num_experts,
            "k_pre": dial.k_pre(model),
            "layers": model.config.num_hidden_layers,
            "bytes_GB": sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9,
            "build_s": build_s,
            "peak_rss_after_build_GB": peak_rss_GB,
        },
        "machine": {"threads": torch.get_num_threads(), "bandwidth_GBps": bandwidth / 1e9},
        "compile_s": 0.0,
        "decode": [],
        "prefill": [],
        "mixed": None,
        "train": [],
    }
    try:
        if config.decode:
            _decode_rows(config, engine, bandwidth, results, note)
        if config.mixed:
            results["mixed"] = _mixed_row(config, engine, bandwidth, note)
            results["compile_s"] += results["mixed"]["compile_s"]
        if config.train:
            results["train"] = _train_rows(config, model, note)
    finally:
        model.set_experts_implementation(saved_implementation)
    return results


# ----------------------------------------------------------------------------- decode and prefill per (k, batch)


def _decode_rows(config: BenchConfig, engine: Engine, bandwidth: float, results: dict, note) -> None:
    """Append one decode and one prefill row per (batch, k) to `results`; engine and stock alternate in each."""
    model, vocab = engine.model, engine.model.config.vocab_size
    for batch in config.batches:
        for k in config.ks:
            decode_ms = {"engine": [], **{s: [] for s in config.stock}}
            prefill_s = {"engine": [], **{s: [] for s in config.stock}}
            results["compile_s"] += _warm_up(engine, random_prompts(config, batch, vocab), [k] * batch, note)
            for repeat in range(config.repeats):
                prompts_BS = random_prompts(config, batch, vocab, offset=repeat)
                # Odd repeats run the contenders in reverse order, so running first or last is no advantage.
                order = ["engine", *config.stock]
                for contender in order if repeat % 2 == 0 else order[::-1]:
                    note(f"decode k={k} batch={batch} repeat {repeat + 1}: {contender}")
                    if contender == "engine":
                        model.set_experts_implementation(IMPLEMENTATION)
                        run = engine_decode(engine, prompts_BS, [k] * batch, config.new_tokens)
                        step, prefill = run.step_s, run.prefill_s
                    else:
                        prefill, step = stock_decode(model, prompts_BS, k, contender, config.new_tokens)
                    decode_ms[contender].append(step * 1e3)
                    prefill_s[contender].append(prefill)
            results["decode"].append(_summarise_decode(decode_ms, model, k, batch, bandwidth))
            results["prefill"].append(_summarise_prefill(prefill_s, k, batch, batch * config.prompt_len))


def _summarise_decode(decode_ms: dict[str, list[float]], model, k: int, batch: int, bandwidth: float) -> dict:
    engine_ms = median(decode_ms["engine"])
    stock_ms = {name: median(values) for name, values in decode_ms.items() if name != "engine"}
    out = {
        "k": k,
        "batch": batch,
        "engine_ms": engine_ms,
        "engine_tok_s": batch * 1e3 / engine_ms,
        "stock_ms": stock_ms,
        "speedup": {name: ms / engine_ms for name, ms in stock_ms.items()},
        "samples": decode_ms["engine"],
    }
    if batch == 1:
        out["floor_ms"] = floor_seconds(model, k, bandwidth) * 1e3
        out["x_floor"] = engine_ms / out["floor_ms"]
        out["floor_bound"] = {name: ms / out["floor_ms"] for name, ms in stock_ms.items()}
    return out


def _summarise_prefill(prefill_s: dict[str, list[float]], k: int, batch: int, tokens: int) -> dict:
    engine = tokens / median(prefill_s["engine"])
    stock = {name: tokens / median(values) for name, values in prefill_s.items() if name != "engine"}
    return {
        "k": k,
        "batch": batch,
        "tokens": tokens,
        "engine_tok_s": engine,
        "stock_tok_s": stock,
        "vs_best_stock": engine / max(stock.values()) if stock else None,
    }


def _warm_up(engine: Engine, prompts_BS: torch.Tensor, ks: list[int], note) -> float:
    """With `compile`, run the rows once untimed so their decode graph is compiled; returns the seconds it took."""
    if not engine.compile:
        return 0.0
    note(f"compiling the decode step for k={ks}")
    start = time.perf_counter()
    engine_decode(engine, prompts_BS, ks, 3)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- the mixed-k batch


def _mixed_row(config: BenchConfig, engine: Engine, bandwidth: float, note) -> dict:
    """Requests at k = 1, 1, 2, 2, 4, 4, 8, 8 as one batch against the same requests one after another. Decode
    throughput (the steps after the prefill) is the headline figure; end to end includes the prefills, which
    batching barely speeds up. The bandwidth bound is the ratio of the floors: the sequential requests' batch-1
    floors against reading, once per batched step, the shared weights and every expert some row uses."""
    model, vocab = engine.model, engine.model.config.vocab_size
    ks = [k for k in (1, 1, 2, 2, 4, 4, 8, 8) if k <= dial.num_experts(model)]
    model.set_experts_implementation(IMPLEMENTATION)
    batched: list[EngineRun] = []
    sequential: list[list[EngineRun]] = []
    identical = True
    compile_s = _warm_up(engine, random_prompts(config, len(ks), vocab), ks, note)
    compile_s += sum(_warm_up(engine, random_prompts(config, 1, vocab), [k], note) for k in sorted(set(ks)))
    for repeat in range(config.repeats):
        prompts_BS = random_prompts(config, len(ks), vocab, offset=100 + repeat)
        for together in (True, False) if repeat % 2 == 0 else (False, True):
            if together:
                note(f"mixed-k batch {ks} repeat {repeat + 1}")
                batched.append(engine_decode(engine, prompts_BS, ks, config.new_tokens))
            else:
                note(f"mixed-k one after another repeat {repeat + 1}")
                sequential.append(
                    [engine_decode(engine, prompts_BS[i : i + 1], [k], config.new_tokens) for i, k in enumerate(ks)]
                )
        identical &= batched[-1].outputs == [run.outputs[0] for run in sequential[-1]]
    note("mixed-k batch: counting the experts each step reads")
    # Counting hooks on a compiled model would recompile it: count on an eager engine (same outputs, tested).
    counting = Engine(model, max_batch_size=len(ks), max_seq_len=engine.max_seq_len) if engine.compile else engine
    distinct = distinct_experts_per_step(
        counting, random_prompts(config, len(ks), vocab, offset=100), ks, config.new_tokens
    )
    tokens = len(ks) * config.new_tokens
    decode_tokens = len(ks) * (config.new_tokens - 1)  # the first token of each request comes from its prefill
    batched_decode = median([run.decode_s for run in batched])
    sequential_decode = median([sum(run.decode_s for run in runs) for runs in sequential])
    batched_total = median([run.prefill_s + run.decode_s for run in batched])
    sequential_total = median([sum(run.prefill_s + run.decode_s for run in runs) for runs in sequential])
    sequential_floor = sum(floor_seconds(model, k, bandwidth) for k in ks)
    batch_floor = batch_floor_seconds(model, distinct, bandwidth)
    return {
        "ks": ks,
        "tokens": tokens,
        "decode_tokens": decode_tokens,
        "batched_decode_tok_s": decode_tokens / batched_decode,
        "sequential_decode_tok_s": decode_tokens / sequential_decode,
        "decode_speedup": sequential_decode / batched_decode,
        "batched_tok_s": tokens / batched_total,
        "sequential_tok_s": tokens / sequential_total,
        "speedup": sequential_total / batched_total,
        "distinct_experts_per_step": distinct,
        "floor_bound": sequential_floor / batch_floor,
        "outputs_identical": identical,
        "compile_s": compile_s,
    }


# ----------------------------------------------------------------------------- training step


def _train_rows(config: BenchConfig, model, note) -> list[dict]:
    """One row per k: a forward + backward with the "phds" experts against stock grouped_mm."""
    rows = []
    for k in config.ks:
        note(f"training step k={k}")
        seconds = train_step_seconds(
            model,
            k,
            [IMPLEMENTATION, "grouped_mm"],
            config.train_batch,
            config.train_seq,
            config.repeats,
            config.seed,
        )
        row = {"k": k, "batch": config.train_batch, "seq": config.train_seq}
        row.update({f"{name}_s": value for name, value in seconds.items()})
        row["speedup_vs_grouped_mm"] = row["grouped_mm_s"] / row[f"{IMPLEMENTATION}_s"]
        rows.append(row)
    return rows
