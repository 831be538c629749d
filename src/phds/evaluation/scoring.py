"""Model calls of the evaluation: batched log-likelihoods (right padding) and greedy generation (left padding).

Both pad with an attention mask, so a batch scores exactly what batch size 1 scores (up to float rounding). For MoE
models the pad tokens are routed too, but routing is per token, so they never change a real token's experts.

Shape suffixes: B rows, T tokens, V vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048


@dataclass
class Scored:
    """The log-likelihood of one continuation given its context.

    Attributes:
        logprob: sum of the continuation tokens' log-probabilities.
        greedy: whether every continuation token is the model's top-1 choice.
        argmax: the model's top-1 token at each continuation position (the text "prediction").
        n_tokens: number of continuation tokens.
    """

    logprob: float
    greedy: bool
    argmax: list[int]
    n_tokens: int


def max_length(model, cap: int | None = None) -> int:
    """The longest sequence to feed: the model's `max_position_embeddings`, capped by `cap`.

    Example: `max_length(model, 1024)`.
    """
    length = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
    return min(length, cap) if cap else length


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id, else 0 (only ever under a zero attention mask).

    Example: `pad_id(tok)`.
    """
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def prefix_token_id(tokenizer) -> int:
    """The token an empty context stands for: bos, else eos (lm-evaluation-harness's `prefix_token_id`).

    Example: `prefix_token_id(tok) == tok.bos_token_id`.
    """
    for value in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    raise ValueError("`tokenizer` has neither a bos nor an eos token to stand in for an empty context; set one")


def encode_text(tokenizer, text: str, *, add_bos_token: bool | None = None) -> list[int]:
    """Token ids of `text` with the special tokens lm-evaluation-harness's HFLM gives it (its `tok_encode`).

    By default the tokenizer adds what it always adds (Llama-style tokenizers a bos, GPT-NeoX / OLMoE / Qwen ones
    nothing). A text that already starts with the bos text gets no second one. `add_bos_token=True` starts every
    text with bos, `False` adds no special tokens at all.

    Example: `encode_text(tok, "2+2=")`.
    """
    bos = tokenizer.bos_token_id
    prefix = bos if bos is not None else tokenizer.eos_token_id
    prefix_text = tokenizer.decode(prefix) if prefix is not None else ""
    if prefix_text and text.startswith(prefix_text):
        return tokenizer(text, add_special_tokens=False).input_ids
    if add_bos_token is None:
        return tokenizer(text).input_ids
    ids = tokenizer(text, add_special_tokens=add_bos_token).input_ids
    if add_bos_token and bos is not None and ids[:1] != [bos]:
        ids = [bos, *ids]
    return ids


def encode_pair(
    tokenizer, context: str, continuation: str, limit: int, *, add_bos_token: bool | None = None
) -> tuple[list[int], list[int]]:
    """Tokenise a (context, continuation) pair exactly as lm-evaluation-harness's HFLM does.

    Trailing whitespace of the context moves to the continuation; the continuation's tokens are those of
    `context + continuation` after the context's tokens, so BPE merges across the boundary are respected. Special
    tokens are those of `encode_text` (by default only what the tokenizer itself adds: no bos for OLMoE or Qwen).
    An empty context becomes the bos (else eos) token, unless the continuation already starts with it. A pair
    longer than `limit + 1` tokens loses context from the left (the last token is never fed, see `loglikelihoods`).

    Example: `encode_pair(tok, "2+2=", "4", 256)`.
    """
    if not context:
        cont = tokenizer(continuation, add_special_tokens=False).input_ids
        prefix = prefix_token_id(tokenizer)
        ctx, cont = ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
        if not cont:
            raise ValueError(f"`continuation` {continuation!r} leaves nothing to score after an empty context")
        return truncate(ctx, cont, limit)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = encode_text(tokenizer, context + continuation, add_bos_token=add_bos_token)
    ctx = encode_text(tokenizer, context, add_bos_token=add_bos_token)
    cont = whole[len(ctx) :]
    if not cont:
        raise ValueError(f"continuation {continuation!r} tokenises to nothing after context {context[-40:]!r}")
    # a whitespace-only context is empty once stripped; lm-eval fails there, we condition on the prefix token
    return truncate(ctx or [prefix_token_id(tokenizer)], cont, limit)


def truncate(ctx: list[int], cont: list[int], limit: int) -> tuple[list[int], list[int]]:
    """Fit a pair into `limit` fed tokens: drop context from the left, then continuation from the right.

    The pair may hold `limit + 1` tokens, since the last continuation token is only a target, never an input (as
    in lm-evaluation-harness); at least one context token always stays.

    Example: `truncate([1, 2, 3], [4], 3) == ([1, 2, 3], [4])`.
    """
    if len(cont) > limit:
        cont = cont[:limit]
    keep = limit + 1 - len(cont)
    return ctx[-keep:], cont


@torch.no_grad()
def loglikelihoods(
    model,
    requests: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int = 8,
    pad: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> list[Scored]:
    """Score every (context ids, continuation ids) request; batches are right-padded, longest first.

    Args:
        model: a causal LM (dial it with `phds.sparsity` around this call).
        requests: token ids; the context must hold at least one token.
        batch_size: rows per forward.
        pad: the pad token id (masked out, so any id works).
        on_batch: called with the number of requests done after each batch (progress bars).

    Example: `loglikelihoods(model, [([1, 40], [41, 42])])[0].logprob`.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    results: list[Scored | None] = [None] * len(requests)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        # the last continuation token is a target only: feeding it would cost a position and change nothing
        rows = [requests[i][0] + requests[i][1][:-1] for i in chunk]
        width = max(len(r) for r in rows)
        ids_BT = torch.full((len(rows), width), pad, dtype=torch.long)
        mask_BT = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            ids_BT[b, : len(row)] = torch.tensor(row)
            mask_BT[b, : len(row)] = 1
        logits_BTV = model(input_ids=ids_BT.to(device), attention_mask=mask_BT.to(device)).logits
        for b, i in enumerate(chunk):
            ctx, cont = requests[i]
            # logits at position t predict token t+1: the continuation is predicted from len(ctx)-1 on.
            logits_TV = logits_BTV[b, len(ctx) - 1 : len(ctx) + len(cont) - 1].float()
            logprobs_TV = torch.log_softmax(logits_TV, dim=-1)
            target_T = torch.tensor(cont, device=logprobs_TV.device)
            argmax_T = logprobs_TV.argmax(dim=-1)
            results[i] = Scored(
                logprob=float(logprobs_TV.gather(1, target_T[:, None]).sum()),
                greedy=bool((argmax_T == target_T).all()),
                argmax=argmax_T.tolist(),
                n_tokens=len(cont),
            )
        if on_batch is not None:
            on_batch(len(chunk))
    return results  # type: ignore[return-value]


class _StopStrings(StoppingCriteria):
    """Per-row stop once the new text contains one of `stops` (eos is handled by `generate` itself)."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_width: int):
        self.tokenizer, self.stops, self.prompt_width = tokenizer, list(stops), prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        done = [any(stop in text for stop in self.stops) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cut_at(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first of `stops`.

    Example: `cut_at("12\\nQ: ...", ["\\n"]) == "12"`.
    """
    for stop in stops:
        if stop in text:
            text = text.split(stop, 1)[0]
    return text


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stops: Sequence[str] = (),
    batch_size: int = 8,
    limit: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy completions of `prompts`, left-padded in batches, each cut at the first stop string.

    Example: `generate(model, tok, ["2+2="], max_new_tokens=4, stops=["\\n"])`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    room = max_length(model, limit) - max_new_tokens
    if room < 1:
        raise ValueError(
            f"`max_new_tokens`={max_new_tokens} leaves no room for a prompt (max length {room + max_new_tokens})"
        )
    encoded = [encode_text(tokenizer, p)[-room:] for p in prompts]
    pad = pad_id(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        ids_BT = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask_BT = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, i in enumerate(chunk):
            ids_BT[b, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask_BT[b, width - len(encoded[i]) :] = 1
        criteria = StoppingCriteriaList([_StopStrings(tokenizer, stops, width)]) if stops else None
        out_BT = model.generate(
            input_ids=ids_BT.to(device),
            attention_mask=mask_BT.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            stopping_criteria=criteria,
        )
        texts = tokenizer.batch_decode(out_BT[:, width:], skip_special_tokens=True)
        for b, i in enumerate(chunk):
            outputs[i] = cut_at(texts[b], stops)
        if on_batch is not None:
            on_batch(len(chunk))
    return outputs
