"""Sampling parameters and the per-row next-token choice: greedy, temperature, nucleus (top-p), seeded.

Shape suffixes: B rows, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(kw_only=True)
class SamplingParams:
    """How one request chooses its tokens and when it stops.

    Attributes:
        max_new_tokens: stop ("length") after this many new tokens.
        temperature: 0 is greedy (argmax, equal to transformers' `generate(do_sample=False)`); > 0 samples.
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
        seed: seeds this request's own generator, so its samples do not depend on the batch it runs in.
        stop_token_ids: more stop tokens; eos is always a stop unless `ignore_eos`.
        ignore_eos: keep generating through eos (benchmarks).

    Example: `SamplingParams(max_new_tokens=32, temperature=0.7, top_p=0.9, seed=0)`.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 1
        ):
            raise ValueError(f"`max_new_tokens` must be an integer >= 1, got {self.max_new_tokens!r}")
        if (
            not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise ValueError(f"`temperature` must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"`top_p` must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"`seed` must be an integer or None, got {self.seed!r}")
        stops = tuple(self.stop_token_ids)
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in stops):
            raise ValueError(f"`stop_token_ids` must be non-negative integers, got {self.stop_token_ids!r}")
        self.stop_token_ids = stops


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's own generator (seeded when `params.seed` is set); None for greedy requests."""
    if params.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return generator


def filter_top_p(logits_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with every token outside the nucleus of mass `top_p` set to -inf (the best token is always kept).

    Example: `filter_top_p(torch.tensor([2.0, 1.0, -3.0]), 0.5)` keeps only the first token.
    """
    if top_p >= 1.0:
        return logits_V
    sorted_V, order_V = logits_V.sort(descending=True)
    cumulative_V = sorted_V.softmax(-1).cumsum(-1)
    drop_V = cumulative_V - sorted_V.softmax(-1) >= top_p  # mass before this token already reaches top_p
    drop_V[0] = False
    return logits_V.masked_fill(drop_V.scatter(0, order_V, drop_V), float("-inf"))


def choose_tokens(
    logits_BV: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One next token per row, each row with its own parameters and generator.

    Example: `choose_tokens(logits, [SamplingParams()], [None])` -> `[argmax]`.
    """
    greedy_B = logits_BV.argmax(-1).tolist()
    tokens = []
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if p.temperature == 0:
            tokens.append(int(greedy_B[row]))
            continue
        logits_V = filter_top_p(logits_BV[row].float() / p.temperature, p.top_p)
        probs_V = logits_V.softmax(-1)
        tokens.append(int(torch.multinomial(probs_V, 1, generator=generator)))
    return tokens
