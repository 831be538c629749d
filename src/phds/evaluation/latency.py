"""Latency and throughput at one k, measured with HF `generate` on the machine at hand.

- prefill tokens/s: `prompt_tokens * batch_size` over the time of a forward that returns the first new token;
- decode ms/token: `(time(generate n+1 tokens) - time(generate 1 token)) / n`, per sequence step;
- active parameters per token: `phds.dial.active_parameters(model, k)`.

Each timing is the fastest of `repeats` runs after one warm-up (as `timeit` advises: slower runs measure other
load on the machine, not the model). Numbers are only comparable within one machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from phds import dial


@dataclass(kw_only=True)
class LatencyConfig:
    """What to time.

    Attributes:
        prompt_tokens: prompt length of the prefill measurement.
        new_tokens: decode steps timed.
        batch_size: rows per call.
        repeats: timed runs (the fastest counts) after one warm-up.
        seed: seed of the random prompt ids.
    """

    prompt_tokens: int = 64
    new_tokens: int = 16
    batch_size: int = 1
    repeats: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "new_tokens", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_generate(model, ids_BT: torch.Tensor, new_tokens: int, pad: int) -> float:
    _sync(ids_BT.device)
    start = time.perf_counter()
    model.generate(
        input_ids=ids_BT,
        attention_mask=torch.ones_like(ids_BT),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    _sync(ids_BT.device)
    return time.perf_counter() - start


@torch.no_grad()
def measure_latency(model, k, config: LatencyConfig | None = None) -> dict[str, float]:
    """Prefill tokens/s, decode ms/token and active parameters per token at `k` (an int or any operating point of
    `phds.points`; a policy's active parameters are those it used on the timed prompts).

    Example: `measure_latency(model, 2)["decode_ms_per_token"]`.
    """
    config = config or LatencyConfig()
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(config.seed)
    # ids from the upper part of the vocabulary avoid the specials (pad/bos/eos) at the low ids.
    ids_BT = torch.randint(vocab // 4, vocab, (config.batch_size, config.prompt_tokens), generator=generator)
    ids_BT = ids_BT.to(device)
    pad = int(model.config.pad_token_id) if getattr(model.config, "pad_token_id", None) is not None else 0
    with dial.sparsity(model, k):
        _timed_generate(model, ids_BT, config.new_tokens + 1, pad)  # warm-up
        first = [_timed_generate(model, ids_BT, 1, pad) for _ in range(config.repeats)]
        full = [_timed_generate(model, ids_BT, config.new_tokens + 1, pad) for _ in range(config.repeats)]
        used = dial.active_experts(model)
    prefill_s = min(first)
    decode_s = max(min(full) - prefill_s, 0.0) / config.new_tokens
    return {
        "active_params": dial.active_parameters(model, k if isinstance(k, int) else used),
        "prefill_tokens_per_s": config.prompt_tokens * config.batch_size / prefill_s,
        "decode_ms_per_token": decode_s * 1000.0,
        "prompt_tokens": config.prompt_tokens,
        "new_tokens": config.new_tokens,
        "batch_size": config.batch_size,
    }
