"""`phds bench`: decode and prefill speed per k, our engine against stock transformers in the same run.

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
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from phds import dial
from phds.engine.engine import Engine, Request
from phds.engine.experts import IMPLEMENTATION
from phds.engine.sampling import SamplingParams

logger = logging.getLogger(__name__)

# The OLMoE-shaped random model of issue 7: 64 experts, k_pre 8, 8 layers, hidden 512, fp32 (1.7 GB).
PRESETS: dict[str, tuple[str, dict]] = {
    "issue7": (
        "olmoe",
        dict(
            num_experts=64,
            num_experts_per_tok=8,
            num_hidden_layers=8,
            hidden_size=512,
            intermediate_size=512,
            vocab_size=8192,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=4096,
        ),
    ),
}


@dataclass(kw_only=True)
class BenchConfig:
    """What `bench` measures.

    Attributes:
        model: checkpoint directory, hub name or `tiny:<family>`; or None with `tiny_config`.
        tiny_config: a preset ("issue7") or `family:field=value,...` for a random tiny model.
        ks: experts per token to measure.
        batches: decode batch sizes.
        prompt_len: prompt tokens per request.
        new_tokens: decode steps timed per measurement.
        repeats: measurements per figure (the median is reported).
        stock: stock transformers experts implementations to compare against.
        decode: run the decode and prefill rows (off for a training-only run).
        mixed: also run the mixed-k batch row.
        train: also time a training step (`train_batch` x `train_seq`) per k.
        threads: torch threads (None keeps torch's default).
        compile: `torch.compile` the engine's decode step (`Engine(compile=True)`); each k and batch shape compiles
            in an untimed warm-up run before it is timed (`compile_s` in the results).
        seed: prompts and the random model.
    """

    model: str | None = None
    tiny_config: str | None = "issue7"
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    batches: list[int] = field(default_factory=lambda: [1])
    prompt_len: int = 64
    new_tokens: int = 32
    repeats: int = 3
    stock: list[str] = field(default_factory=lambda: ["grouped_mm", "eager"])
    decode: bool = True
    mixed: bool = True
    train: bool = False
    train_batch: int = 4
    train_seq: int = 128
    threads: int | None = None
    compile: bool = False
    seed: int = 0

    def __post_init__(self):
        for name in ("prompt_len", "new_tokens", "repeats", "train_batch", "train_seq"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
        if self.new_tokens < 2:
            raise ValueError(f"`new_tokens` must be >= 2 to time a decode step, got {self.new_tokens}")
        for name in ("ks", "batches"):
            values = getattr(self, name)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"`{name}` must be a non-empty list of integers >= 1, got {values!r}")
        unknown = [s for s in self.stock if s not in ("eager", "grouped_mm", "batched_mm")]
        if unknown:
            raise ValueError(f"`stock` must name eager, grouped_mm or batched_mm, got {unknown}")
        if (self.model is None) == (self.tiny_config is None):
            raise ValueError("give exactly one of `model` and `tiny_config`")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"`threads` must be an integer >= 1, got {self.threads!r}")


def build_model(config: BenchConfig):
    """The model to benchmark, in eval mode (fp32 for tiny configs).

    Example: `build_model(BenchConfig(tiny_config="olmoe:num_experts=16"))`.
    """
    if config.model is not None:
        from phds.loading import load

        model, _ = load(config.model, tokenizer=False, device="cpu")
        return model
    from phds.tiny import tiny_model

    name = config.tiny_config
    if name in PRESETS:
        arch, overrides = PRESETS[name]
    else:
        arch, _, fields = name.partition(":")
        overrides = {}
        for item in filter(None, (f.strip() for f in fields.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"`tiny_config` fields must be key=value, got {item!r} in {name!r}")
            overrides[key] = _literal(value)
    return tiny_model(arch, seed=config.seed, **overrides)


def _literal(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ----------------------------------------------------------------------------- measurements


def measure_bandwidth(num_bytes: int = 512 * 2**20, repeats: int = 7) -> float:
    """Memory read bandwidth in bytes/s: the median time to sum a `num_bytes` fp32 tensor.

    Example: `measure_bandwidth() / 1e9  # GB/s`.
    """
    data = torch.ones(num_bytes // 4)
    data.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return num_bytes / _median(times)


def floor_seconds(model, k: int, bandwidth: float) -> float:
    """Time to read the weights one token touches at `k` once, at `bandwidth` bytes/s (batch 1 decode floor)."""
    element = next(model.parameters()).element_size()
    return dial.active_parameters(model, k) * element / bandwidth


class _StepTimer(LogitsProcessor):
    """Records when each generation step's logits arrive (stock `generate()` timing)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def random_prompts(config: BenchConfig, batch: int, vocab: int, offset: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(config.seed + offset)
    return torch.randint(4, vocab, (batch, config.prompt_len), generator=generator)


def stock_decode(model, prompts_BS: torch.Tensor, k: int, implementation: str, new_tokens: int):
    """(prefill seconds, median decode-step seconds) of stock `generate()` at `k` with `implementation`."""
    model.set_experts_implementation(implementation)
    timer = _StepTimer()
    with dial.sparsity(model, k), torch.inference_mode():
        start = time.perf_counter()
        model.generate(
            prompts_BS,
            attention_mask=torch.ones_like(prompts_BS),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            logits_processor=LogitsProcessorList([timer]),
            pad_token_id=0,
        )
    steps = [b - a for a, b in zip(timer.times, timer.times[1:], strict=False)]
    return timer.times[0] - start, _median(steps)


@dataclass
class EngineRun:
    """One engine run: prefill (the first step, which admits every row), decode steps, and each row's tokens."""

    prefill_s: float
    step_s: float  # median decode step
    decode_s: float  # all decode steps
    outputs: list[list[int]]


def engine_decode(engine: Engine, prompts_BS: torch.Tensor, ks: list[int], new_tokens: int) -> EngineRun:
    """Run `prompts_BS` (one request per row, row i at `ks[i]`) through the engine for `new_tokens` tokens each."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    for i, (prompt, k) in enumerate(zip(prompts_BS.tolist(), ks, strict=True)):
        engine.add(Request(request_id=f"bench-{i}", prompt_ids=prompt, k=k, params=params))
    outputs: dict[str, list[int]] = {}
    times = [time.perf_counter()]
    while engine.has_work():
        for event in engine.step():
            outputs.setdefault(event.request_id, []).append(event.token_id)
        times.append(time.perf_counter())
    steps = [b - a for a, b in zip(times[1:], times[2:], strict=False)]
    ordered = [outputs[f"bench-{i}"] for i in range(len(ks))]
    return EngineRun(times[1] - times[0], _median(steps), sum(steps), ordered)


def distinct_experts_per_step(engine: Engine, prompts_BS: torch.Tensor, ks: list[int], new_tokens: int) -> float:
    """Routed experts with a non-zero weight summed over the MoE layers, averaged over the decode steps of an engine
    run: what one batched decode step has to read (counted in a separate, untimed run)."""
    counts: list[int] = []

    def count(module, args, kwargs):
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]
        if index.shape[0] == len(ks):  # decode steps only: one token per row
            counts.append(int(index.reshape(weights.shape)[weights != 0].unique().numel()))

    layers = dial.moe_layers(engine.model)
    handles = [layer.experts.register_forward_pre_hook(count, with_kwargs=True) for layer in layers]
    try:
        engine_decode(engine, prompts_BS, ks, new_tokens)
    finally:
        for handle in handles:
            handle.remove()
    return sum(counts) / max(1, len(counts) // len(layers))


def batch_floor_seconds(model, distinct_experts: float, bandwidth: float) -> float:
    """Time to read the weights of one batched decode step once: everything but the routed experts, plus
    `distinct_experts` experts (summed over layers; experts of one model are assumed equal in size)."""
    layers = dial.moe_layers(model)
    per_expert = [sum(p.numel() for p in layer.experts.parameters()) // layer.num_experts for layer in layers]
    shared = dial.active_parameters(model, 1) - sum(per_expert)
    element = next(model.parameters()).element_size()
    return (shared + distinct_experts * sum(per_expert) / len(layers)) * element / bandwidth


def train_step_seconds(
    model, k: int, implementations: list[str], batch: int, seq: int, repeats: int, seed: int
) -> dict[str, float]:
    """Median seconds of one forward + backward (causal-LM loss) at `k` for each experts implementation; the
    implementations alternate step by step, and swap places every round, so a load change on a shared machine and
    running first or second hit them alike."""
    ids = torch.randint(4, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    times: dict[str, list[float]] = {name: [] for name in implementations}
    model.train()
    try:
        with dial.sparsity(model, k):
            for round_ in range(repeats + 1):  # the first round warms up; odd rounds run in reverse order
                for name in implementations if round_ % 2 == 0 else implementations[::-1]:
                    model.set_experts_implementation(name)
                    start = time.perf_counter()
                    model(ids, labels=ids).loss.backward()
                    times[name].append(time.perf_counter() - start)
                    # Keep the gradient buffers: freeing 1.7 GB of them every step made step times alternate
                    # between 1.4 and 3.0 s here (the memory goes back to the OS and is page-faulted in again).
                    model.zero_grad(set_to_none=False)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    return {name: _median(values[1:]) for name, values in times.items()}


# ----------------------------------------------------------------------------- the run


def bench(config: BenchConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Run every measurement of `config` and return the results (JSON-ready).

    Args:
        config: what to measure.
        progress: called with a short description before each measurement (the CLI drives a progress bar).

    Example: `bench(BenchConfig(tiny_config="olmoe", ks=[1, 4], repeats=1))["decode"][0]["engine_ms"]`.
    """
    note = progress or (lambda text: None)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    note("building the model")
    model = build_model(config).eval()
    max_k = min(layer.num_experts for layer in dial.moe_layers(model))
    too_big = [k for k in config.ks if k > max_k]
    if too_big:
        raise ValueError(f"`ks` must be at most the number of experts ({max_k}), got {too_big}")
    saved_implementation = model.config._experts_implementation
    vocab = model.config.vocab_size
    note("measuring memory bandwidth")
    bandwidth = measure_bandwidth()
    max_batch = max(config.batches + ([8] if config.mixed else []))
    max_len = config.prompt_len + config.new_tokens + 1
    model.set_experts_implementation(IMPLEMENTATION)
    engine = Engine(model, max_batch_size=max_batch, max_seq_len=max_len, compile=config.compile)
    results: dict = {
        "config": asdict(config),
        "model": {
            "class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype),
            "num_experts": max_k,
            "k_pre": dial.k_pre(model),
            "layers": model.config.num_hidden_layers,
        },
        "machine": {"threads": torch.get_num_threads(), "bandwidth_GBps": bandwidth / 1e9},
        "compile_s": 0.0,
        "decode": [],
        "prefill": [],
        "mixed": None,
        "train": [],
    }
    for batch in config.batches if config.decode else []:
        for k in config.ks:
            row = {"k": k, "batch": batch, "engine_ms": [], "stock_ms": {s: [] for s in config.stock}}
            prefill = {
                "k": k,
                "batch": batch,
                "tokens": batch * config.prompt_len,
                "engine_s": [],
                "stock_s": {s: [] for s in config.stock},
            }
            results["compile_s"] += _warm_up(engine, random_prompts(config, batch, vocab), [k] * batch, note)
            for repeat in range(config.repeats):
                prompts = random_prompts(config, batch, vocab, offset=repeat)
                # Odd repeats run the contenders in reverse order, so running first or last is no advantage.
                order = [None, *config.stock]
                for implementation in order if repeat % 2 == 0 else order[::-1]:
                    note(f"decode k={k} batch={batch} repeat {repeat + 1}: {implementation or 'engine'}")
                    if implementation is None:
                        model.set_experts_implementation(IMPLEMENTATION)
                        run = engine_decode(engine, prompts, [k] * batch, config.new_tokens)
                        row["engine_ms"].append(run.step_s * 1e3)
                        prefill["engine_s"].append(run.prefill_s)
                    else:
                        pre, step = stock_decode(model, prompts, k, implementation, config.new_tokens)
                        row["stock_ms"][implementation].append(step * 1e3)
                        prefill["stock_s"][implementation].append(pre)
            results["decode"].append(_summarise_decode(row, model, k, batch, bandwidth))
            results["prefill"].append(_summarise_prefill(prefill))
    if config.mixed:
        results["mixed"] = _mixed_row(config, engine, model, vocab, bandwidth, note)
        results["compile_s"] += results["mixed"]["compile_s"]
    if config.train:
        for k in config.ks:
            note(f"training step k={k}")
            entry = {"k": k, "batch": config.train_batch, "seq": config.train_seq}
            seconds = train_step_seconds(
                model,
                k,
                [IMPLEMENTATION, "grouped_mm"],
                config.train_batch,
                config.train_seq,
                config.repeats,
                config.seed,
            )
            entry.update({f"{name}_s": value for name, value in seconds.items()})
            entry["speedup_vs_grouped_mm"] = entry["grouped_mm_s"] / entry[f"{IMPLEMENTATION}_s"]
            results["train"].append(entry)
    model.set_experts_implementation(saved_implementation)
    results["goals"] = _goals(results)
    return results


def _summarise_decode(row: dict, model, k: int, batch: int, bandwidth: float) -> dict:
    engine_ms = _median(row["engine_ms"])
    stock_ms = {name: _median(values) for name, values in row["stock_ms"].items()}
    out = {
        "k": k,
        "batch": batch,
        "engine_ms": engine_ms,
        "engine_tok_s": batch * 1e3 / engine_ms,
        "stock_ms": stock_ms,
        "speedup": {name: ms / engine_ms for name, ms in stock_ms.items()},
        "samples": row["engine_ms"],
    }
    if batch == 1:
        out["floor_ms"] = floor_seconds(model, k, bandwidth) * 1e3
        out["x_floor"] = engine_ms / out["floor_ms"]
        out["floor_bound"] = {name: ms / out["floor_ms"] for name, ms in stock_ms.items()}
    return out


def _summarise_prefill(prefill: dict) -> dict:
    tokens = prefill["tokens"]
    engine = tokens / _median(prefill["engine_s"])
    stock = {name: tokens / _median(values) for name, values in prefill["stock_s"].items()}
    return {
        "k": prefill["k"],
        "batch": prefill["batch"],
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


def _mixed_row(config: BenchConfig, engine: Engine, model, vocab: int, bandwidth: float, note) -> dict:
    """Requests at k = 1, 1, 2, 2, 4, 4, 8, 8 as one batch against the same requests one after another. Decode
    throughput (the steps after the prefill) is the issue's figure; end to end includes the prefills, which batching
    barely speeds up. The bandwidth bound is the ratio of the floors: the sequential requests' batch-1 floors
    against reading, once per batched step, the shared weights and every expert some row uses."""
    ks = [k for k in (1, 1, 2, 2, 4, 4, 8, 8) if k <= min(layer.num_experts for layer in dial.moe_layers(model))]
    model.set_experts_implementation(IMPLEMENTATION)
    batched: list[EngineRun] = []
    sequential: list[list[EngineRun]] = []
    identical = True
    compile_s = _warm_up(engine, random_prompts(config, len(ks), vocab), ks, note)
    compile_s += sum(_warm_up(engine, random_prompts(config, 1, vocab), [k], note) for k in sorted(set(ks)))
    for repeat in range(config.repeats):
        prompts = random_prompts(config, len(ks), vocab, offset=100 + repeat)
        for together in (True, False) if repeat % 2 == 0 else (False, True):
            if together:
                note(f"mixed-k batch {ks} repeat {repeat + 1}")
                batched.append(engine_decode(engine, prompts, ks, config.new_tokens))
            else:
                note(f"mixed-k one after another repeat {repeat + 1}")
                sequential.append(
                    [engine_decode(engine, prompts[i : i + 1], [k], config.new_tokens) for i, k in enumerate(ks)]
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
    batched_decode = _median([run.decode_s for run in batched])
    sequential_decode = _median([sum(run.decode_s for run in runs) for runs in sequential])
    batched_total = _median([run.prefill_s + run.decode_s for run in batched])
    sequential_total = _median([sum(run.prefill_s + run.decode_s for run in runs) for runs in sequential])
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


def _goals(results: dict) -> dict:
    """The issue's goals, evaluated on this run's figures (True/False, None when not measured)."""
    batch1 = {row["k"]: row for row in results["decode"] if row["batch"] == 1}
    goals: dict = {}
    if batch1:
        goals["decode_within_2x_floor"] = all(row["x_floor"] <= 2.0 for row in batch1.values())
        if "eager" in next(iter(batch1.values()))["speedup"]:
            goals["decode_3x_faster_than_eager"] = all(row["speedup"]["eager"] >= 3.0 for row in batch1.values())
            # An engine at the floor is stock/floor times faster than stock: where that is below 3, no engine
            # reading these weights meets the goal on this machine.
            goals["decode_3x_reachable_at_floor"] = all(row["floor_bound"]["eager"] >= 3.0 for row in batch1.values())
        low, high = min(batch1), max(batch1)
        if low != high:
            time_ratio = batch1[high]["engine_ms"] / batch1[low]["engine_ms"]
            floor_ratio = batch1[high]["floor_ms"] / batch1[low]["floor_ms"]
            goals["dial_payoff"] = {
                "time_ratio": time_ratio,
                "floor_ratio": floor_ratio,
                "met": time_ratio >= 0.8 * floor_ratio,
            }
    if results["mixed"] is not None:
        mixed = results["mixed"]
        goals["mixed_batch_2_5x"] = mixed["decode_speedup"] >= 2.5 and mixed["outputs_identical"]
        goals["mixed_batch_2_5x_reachable_at_floor"] = mixed["floor_bound"] >= 2.5
    prefill = [row["vs_best_stock"] for row in results["prefill"] if row["vs_best_stock"] is not None]
    if prefill:
        goals["prefill_not_slower_than_best_stock"] = all(ratio >= 1.0 for ratio in prefill)
    if results["train"]:
        train = {row["k"]: row for row in results["train"]}
        goals["train_not_slower_than_grouped_mm"] = all(row["speedup_vs_grouped_mm"] >= 1.0 for row in train.values())
        if len(train) > 1:
            low, high = min(train), max(train)
            goals["train_k_low_vs_high"] = train[low][f"{IMPLEMENTATION}_s"] / train[high][f"{IMPLEMENTATION}_s"]
    return goals


# ----------------------------------------------------------------------------- tables


def result_tables(results: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The run's figures as (title, header, rows) tables of formatted cells: `phds bench` prints them with rich,
    `benchmarks/render_markdown.py` as Markdown."""
    stock = list(results["config"]["stock"])
    tables = []
    if results["decode"]:
        header = ["k", "batch", "engine ms", "floor ms", "engine / floor"]
        header += [f"{s} ms" for s in stock] + [f"vs {s}" for s in stock] + [f"{s} / floor" for s in stock]
        rows = []
        for row in results["decode"]:
            at_floor = row.get("floor_bound", {})
            rows.append(
                [str(row["k"]), str(row["batch"]), f"{row['engine_ms']:.2f}"]
                + [f"{row['floor_ms']:.3g}" if "floor_ms" in row else "-"]
                + [f"{row['x_floor']:.2f}" if "x_floor" in row else "-"]
                + [f"{row['stock_ms'][s]:.2f}" for s in stock]
                + [f"{row['speedup'][s]:.2f}x" for s in stock]
                + [f"{at_floor[s]:.2f}x" if s in at_floor else "-" for s in stock]
            )
        tables.append(("decode (ms per token per sequence; medians)", header, rows))
        header = ["k", "batch", "prompt tokens", "engine tok/s"] + [f"{s} tok/s" for s in stock] + ["vs best stock"]
        rows = [
            [str(row["k"]), str(row["batch"]), str(row["tokens"]), f"{row['engine_tok_s']:.0f}"]
            + [f"{row['stock_tok_s'][s]:.0f}" for s in stock]
            + [f"{row['vs_best_stock']:.2f}x" if row["vs_best_stock"] is not None else "-"]
            for row in results["prefill"]
        ]
        tables.append(("prefill (tokens/s; medians)", header, rows))
    mixed = results["mixed"]
    if mixed is not None:
        header = ["", "one batch tok/s", "one after another tok/s", "speed-up", "bandwidth bound"]
        rows = [
            [
                "decode",
                f"{mixed['batched_decode_tok_s']:.1f}",
                f"{mixed['sequential_decode_tok_s']:.1f}",
                f"{mixed['decode_speedup']:.2f}x",
                f"{mixed['floor_bound']:.2f}x",
            ],
            [
                "with prefill",
                f"{mixed['batched_tok_s']:.1f}",
                f"{mixed['sequential_tok_s']:.1f}",
                f"{mixed['speedup']:.2f}x",
                "-",
            ],
        ]
        title = (
            f"mixed-k batch k={mixed['ks']}: {mixed['distinct_experts_per_step']:.0f} experts (all layers) read per "
            f"batched step; outputs identical to each alone: {mixed['outputs_identical']}"
        )
        tables.append((title, header, rows))
    if results["train"]:
        header = ["k", "batch x seq", "phds s", "grouped_mm s", "speed-up"]
        rows = [
            [
                str(row["k"]),
                f"{row['batch']}x{row['seq']}",
                f"{row['phds_s']:.3f}",
                f"{row['grouped_mm_s']:.3f}",
                f"{row['speedup_vs_grouped_mm']:.2f}x",
            ]
            for row in results["train"]
        ]
        tables.append(("training step, forward + backward (s; medians)", header, rows))
    return tables


def run_summary(results: dict) -> str:
    """One line: the model and what the machine gave this run."""
    machine, info = results["machine"], results["model"]
    return (
        f"{info['class']} {info['parameters'] / 1e6:.0f}M params {info['dtype']}, {info['num_experts']} experts, "
        f"k_pre {info['k_pre']}; {machine['threads']} torch threads, measured read bandwidth "
        f"{machine['bandwidth_GBps']:.1f} GB/s"
        + (
            f"; engine compiled (warm-up {results['compile_s']:.0f} s, untimed)"
            if results["config"].get("compile")
            else ""
        )
    )
