"""The measurements behind `phds bench`: memory bandwidth and the floor it implies, stock `generate()` and engine
decode timings, the experts a batched step reads, and a training step.

Shape suffixes: B rows, S sequence positions.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from phds import dial
from phds.bench.config import BenchConfig
from phds.engine.engine import Engine, Request
from phds.engine.sampling import SamplingParams


def median(values: list[float]) -> float:
    """The median, or NaN for no values (a section that measured nothing)."""
    return statistics.median(values) if values else float("nan")


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
    return num_bytes / median(times)


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
    """`batch` prompts of `config.prompt_len` random token ids (ids below 4 are left to special tokens), seeded by
    `config.seed + offset`."""
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
    return timer.times[0] - start, median(steps)


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
    return EngineRun(times[1] - times[0], median(steps), sum(steps), ordered)


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
    return {name: median(values[1:]) for name, values in times.items()}
