"""The decode engine: continuous batching of requests, each with its own k, over a transformers MoE model.

Shape suffixes: B rows, S sequence, V vocabulary.

`step()` admits waiting requests into free rows (prefill), then runs one decode step for every running row.
Rows join and leave between steps; the server drives the engine from one background thread (not thread-safe).
While rows are running the model's dial (one k per row), its experts implementation (the sparse "phds" path) and
its `nn.Linear` classes (`decode_linear.DecodeLinear`) belong to the engine; all are restored when the engine goes
idle, so do not run the same model elsewhere between steps.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import numbers
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from phds import dial
from phds.engine.cache import SlotCache, attention_masks
from phds.engine.decode_linear import decode_linears
from phds.engine.experts import IMPLEMENTATION, apply_to_other_experts, prepare_compile, restore_other_experts
from phds.engine.sampling import SamplingParams, choose_tokens, make_generator
from phds.engine.threads import ThreadPolicy
from phds.sidecar import check_k

logger = logging.getLogger(__name__)

_RECOMPILE_LIMIT = 64
# Inductor options for the decode graph. A one-row decode linear becomes a multiply-and-sum that Inductor fuses
# with its producers; by default it inlines the RMSNorm before it into the reduction (recomputed for every output
# row: the 50304-row lm_head ran at 8 GB/s) and fuses the reductions sharing an input (q, k, v) into one loop over
# several weight streams. Realizing pointwise results of more than 5 ops and no horizontal fusion took a decode step
# of the olmoe-1b-7b-shape benchmark model (bf16, 1 thread) from 48.7 to 31.6 ms at k=1 and 75.0 to 62.3 at k=8;
# a threshold of 2 also realizes the experts' gathered weights (a copy of them: 296 ms at k=8).
COMPILE_OPTIONS = {"realize_opcount_threshold": 5, "cpp.max_horizontal_fusion_size": 1}
# Longest forward (new tokens per row) that runs with eager attention instead of SDPA on the CPU (`_attention_for`).
EAGER_ATTENTION_MAX_NEW = 128


@dataclass(kw_only=True)
class Request:
    """One generation request.

    Attributes:
        request_id: unique among the engine's waiting and running requests.
        prompt_ids: prompt token ids (non-empty).
        k: experts per token for this request: an int, or a `{layer_index: k}` dict naming every MoE layer (a
            `phds allocate` allocation). Rows at an int k share a forward pass whatever their ks; a row at a
            per-layer k shares it only with rows at the same dict, so a request at another one waits (in order)
            until the running rows have finished.
        params: sampling and stop parameters.

    Example: `Request(request_id="a", prompt_ids=[1, 5, 6], k=2, params=SamplingParams(max_new_tokens=8))`.
    """

    request_id: str
    prompt_ids: list[int]
    k: int | Mapping[int, int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class TokenEvent:
    """One new token of a request (or its end). `token_id` is None only for a finish event with no new token."""

    request_id: str
    token_id: int | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "cancelled" | "error: ..." (this request alone failed)


@dataclass
class _Row:
    request: Request
    generator: torch.Generator | None
    length: int  # tokens in the cache
    last_token: int = -1
    generated: int = 0


class Engine:
    """Continuous-batching decode engine with a k per request.

    Args:
        model: a transformers MoE causal LM (any family `phds.moe_layers` finds).
        tokenizer: optional; only its eos id is read.
        max_batch_size: rows decoded together.
        max_seq_len: prompt + new tokens per request (default: the model's `max_position_embeddings`).
        compile: compile the one-token decode forward with `torch.compile(dynamic=True)` (gpt-fast's split:
            prefill shapes vary too much). Each k and batch shape compiles once, 4-16 s on a 2-core CPU; then a
            batch-1 step of the olmoe-shape-small benchmark model is 1.5-1.6x faster there (`benchmarks/bench_compile.py`). One token's
            experts are gathered by index inside the graph, a batch's run as one opaque op
            (`experts.prepare_compile`). CUDA graphs are not used, and compiling on CUDA is untested (no GPU in
            this project's CI).
        threads: a `threads.ThreadPolicy` applied before every step (the CPU threads a step may use; adaptive ones
            follow the cores other processes leave free). None: torch's thread count as it is. A compiled engine
            needs a fixed count (each count is a graph of its own).

    Example: `Engine(model).generate([[1, 5, 6]], ks=2, params=SamplingParams(max_new_tokens=8))`.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        compile: bool = False,
        threads: ThreadPolicy | None = None,
    ):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be an integer >= 1, got {max_batch_size!r}")
        config = model.config
        limit = getattr(config, "max_position_embeddings", None)
        if max_seq_len is None:
            max_seq_len = limit or 2048
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"`max_seq_len` must be an integer >= 2, got {max_seq_len!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.compile = bool(compile)
        if threads is not None and not isinstance(threads, ThreadPolicy):
            raise ValueError(f"`threads` must be a phds.engine.threads.ThreadPolicy or None, got {threads!r}")
        if threads is not None and self.compile and threads.adaptive:
            raise ValueError("a compiled engine needs a fixed thread count: ThreadPolicy(adaptive=False) or threads=N")
        self.threads = threads
        self.device = next(model.parameters()).device
        # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name warns until 5.40).
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._decode_forward = model.forward
        if self.compile:
            logger.info("compile=True: the first decode step at each k and batch shape compiles (4-16 s on CPU)")
            prepare_compile(model)
            # Every k the rows use and every batch-shape class is a graph of its own (the dial's k is a static
            # integer of each router); torch's default limit of 8 would silently fall back to eager.
            self._decode_forward = torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT)(
                torch.compile(model.forward, dynamic=True, options=COMPILE_OPTIONS)
            )
        self.layers = dial.moe_layers(model)
        self.max_k = dial.num_experts(model)
        self.eos_ids = _eos_ids(model, tokenizer)
        self._waiting: deque[Request] = deque()
        self._rows: list[_Row] = []  # running rows; row i lives in cache row i
        self.config = model.config
        self.dtype = next(model.parameters()).dtype
        window = getattr(self.config, "sliding_window", None) and getattr(self.config, "use_sliding_window", True)
        self._plain_causal = not window and "sliding_attention" not in (
            getattr(self.config, "layer_types", None) or ()
        )
        self.cache = SlotCache(num_layers=config.num_hidden_layers, num_rows=max_batch_size, max_len=max_seq_len)
        self._cancelled: set[str] = set()
        self._dial_stack = contextlib.ExitStack()
        self._dialled: tuple | None = None  # the `_dial_key`s of the rows the dial is set for

    # ------------------------------------------------------------------ queue

    def add(self, request: Request) -> None:
        """Queue `request`; it is prefilled at the next `step()` with a free row. Raises ValueError for bad input."""
        self._check(request)
        self._cancelled.discard(request.request_id)
        self._waiting.append(request)

    def _check(self, request: Request) -> None:
        if not isinstance(request, Request):
            raise TypeError(f"`request` must be a phds.engine.Request, got {type(request).__name__}")
        if not isinstance(request.params, SamplingParams):
            raise ValueError(f"`request.params` must be SamplingParams, got {type(request.params).__name__}")
        if isinstance(request.k, Mapping):
            indices = sorted(layer.index for layer in self.layers)
            if set(request.k) != set(indices):
                raise ValueError(
                    f"a per-layer `k` must name every MoE layer {indices}, got layers {sorted(request.k, key=str)}"
                )
            for index, k in request.k.items():
                check_k(k, name=f"k[{index}]", num_experts=self.max_k)
        else:
            check_k(request.k, num_experts=self.max_k)
        prompt = list(request.prompt_ids)
        vocab = self.model.config.vocab_size
        if not prompt or any(
            isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab for t in prompt
        ):
            raise ValueError(f"`prompt_ids` must be a non-empty list of token ids in [0, {vocab}), got {prompt[:8]!r}")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(
                f"`prompt_ids` has {len(prompt)} tokens; it must be shorter than max_seq_len={self.max_seq_len}"
            )
        if request.request_id in self._running_ids() or any(r.request_id == request.request_id for r in self._waiting):
            raise ValueError(f"`request_id` {request.request_id!r} is already waiting or running")

    def cancel(self, request_id: str) -> None:
        """Cancel a waiting or running request; its slot is freed (and a "cancelled" event sent) at the next step."""
        if request_id in self._running_ids() or any(r.request_id == request_id for r in self._waiting):
            self._cancelled.add(request_id)

    def _running_ids(self) -> set[str]:
        return {row.request.request_id for row in self._rows}

    def has_work(self) -> bool:
        return bool(self._waiting or self._rows or self._cancelled)

    def num_running(self) -> int:
        return len(self._rows)

    def num_waiting(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[TokenEvent]:
        """Free cancelled rows, admit waiting requests into free rows, and decode one token for every running row."""
        events = self._drop_cancelled()
        if self.threads is not None:
            self.threads.apply()
        decoding = len(self._rows)
        joining = []
        keys = [_dial_key(row.request.k) for row in self._rows]
        while self._waiting and decoding + len(joining) < self.max_batch_size:
            keys.append(_dial_key(self._waiting[0].k))
            if not _can_share(keys):
                break  # another per-layer k: it waits for the running rows
            joining.append(self._waiting.popleft())
        if joining:
            events.extend(self._admit(joining))
        if decoding:
            events.extend(self._decode(decoding))
        if not self._rows:
            self._release_dial()
        return events

    def generate(
        self,
        prompts: list[list[int]],
        ks: list[int | Mapping[int, int]] | int | Mapping[int, int],
        params: SamplingParams | None = None,
    ) -> list[list[int]]:
        """Run `prompts` to completion (each at its k) and return the new tokens of each, in order.

        Example: `engine.generate([[1, 5], [1, 7, 8]], ks=[1, 4])`.
        """
        params = params if params is not None else SamplingParams()
        if isinstance(ks, numbers.Integral) and not isinstance(ks, bool):
            ks = [int(ks)] * len(prompts)
        elif isinstance(ks, Mapping):  # one per-layer k for every prompt
            ks = [ks] * len(prompts)
        if len(ks) != len(prompts):
            raise ValueError(f"`ks` must be one k or one k per prompt ({len(prompts)}), got {len(ks)} ks")
        ids = [f"_generate-{i}" for i in range(len(prompts))]
        requests = [
            Request(request_id=request_id, prompt_ids=list(prompt), k=k, params=params)
            for request_id, prompt, k in zip(ids, prompts, ks, strict=True)
        ]
        for request in requests:  # validate every request before queueing any
            self._check(request)
        for request in requests:
            self.add(request)
        outputs: dict[str, list[int]] = {i: [] for i in ids}
        while self.has_work():
            for event in self.step():
                if event.request_id in outputs and event.token_id is not None:
                    outputs[event.request_id].append(event.token_id)
        return [outputs[i] for i in ids]

    # ------------------------------------------------------------------ internals

    def _drop_cancelled(self) -> list[TokenEvent]:
        events = []
        for request_id in sorted(self._cancelled):
            if request_id in self._running_ids():
                self._remove(request_id)
            elif not any(r.request_id == request_id for r in self._waiting):
                continue
            events.append(TokenEvent(request_id, None, True, "cancelled"))
        self._waiting = deque(r for r in self._waiting if r.request_id not in self._cancelled)
        self._cancelled.clear()
        return events

    def _forward(self, first_row: int, rows: list[_Row], input_ids_BQ: torch.Tensor, lengths_B: list[int]):
        """One forward over cache rows `first_row...`: row b's tokens go at its current length; returns (B, V)
        logits at each row's last real token (prefill rows are right-padded to the longest prompt)."""
        num_new = input_ids_BQ.shape[1]
        with _attention_implementation(self.model, self._attention_for(num_new)):
            return self._forward_with(first_row, rows, input_ids_BQ, lengths_B)

    def _attention_for(self, num_new: int) -> str:
        """Eager attention on the CPU where the model uses SDPA, for forwards of at most `EAGER_ATTENTION_MAX_NEW`
        new tokens a row: torch's CPU SDPA kernel has a fixed cost per layer that dominates short queries. On the
        olmoe-1b-7b-shape benchmark model (bf16): a decode step 71.6 -> 63.4 ms eager and 31.6 -> 28.7 ms compiled
        (1 thread); a 64-token prefill 195 -> 164 ms (2 threads), on par at 256 tokens, and slower at 1024 (2.5-2.9
        s against 1.9-2.0: long prompts' scores are materialised), so longer forwards keep the model's own."""
        own = self.model.config._attn_implementation
        short = num_new <= EAGER_ATTENTION_MAX_NEW
        return "eager" if short and own == "sdpa" and self.device.type == "cpu" else own

    def _forward_with(self, first_row: int, rows: list[_Row], input_ids_BQ: torch.Tensor, lengths_B: list[int]):
        num_new = input_ids_BQ.shape[1]
        begin = [row.length if num_new == 1 else 0 for row in rows]
        self.cache.prepare(first_row, begin, num_new, self.device)
        begin_B = self.cache.begin_B
        lengths = torch.tensor(lengths_B, device=self.device)
        if self._plain_causal and len(set(lengths_B)) == 1 and lengths_B[0] == begin[0] + num_new:
            # Every row is exactly as long as the cache span: the plain causal mask transformers builds (or skips,
            # for SDPA) is the right one, and cheaper than a custom 4-D mask.
            masks = None
        else:
            masks = attention_masks(self.config, begin_B, lengths, num_new, self.cache.span, self.dtype)
        positions_BQ = begin_B.unsqueeze(1) + torch.arange(num_new, device=self.device)
        last_B1 = (lengths - 1 - begin_B).unsqueeze(1)
        self._dial_rows(tuple(row.request.k for row in rows))
        forward = self._decode_forward if num_new == 1 else self.model.forward
        with torch.inference_mode():
            out = forward(
                input_ids=input_ids_BQ,
                attention_mask=masks,
                position_ids=positions_BQ,
                use_cache=True,
                logits_to_keep=last_B1,
                **{self._cache_kwarg: self.cache},
            )
        return out.logits[:, 0]

    def _dial_rows(self, ks: tuple[int | Mapping[int, int], ...]) -> None:
        """Dial the model to one k per row (or to the rows' shared per-layer k). Dialling walks the whole model
        (about a millisecond), so the dial is held across steps and only changed when the rows' ks change;
        `_release_dial` restores the model's own k when the engine goes idle."""
        keys = tuple(_dial_key(k) for k in ks)
        if keys == self._dialled:
            return
        assert _can_share(keys), f"rows at different per-layer ks in one forward: {keys}"
        self._release_dial()
        if len(set(keys)) > 1:
            k = torch.tensor(ks, device=self.device)  # one int k per row
        else:
            k = dict(ks[0]) if isinstance(ks[0], Mapping) else ks[0]
        self._dial_stack.enter_context(dial.sparsity(self.model, k))
        self._dial_stack.enter_context(_experts_implementation(self.model, IMPLEMENTATION))
        self._dial_stack.enter_context(decode_linears(self.model))
        self._dialled = keys

    def _release_dial(self) -> None:
        self._dial_stack.close()
        self._dialled = None

    def _admit(self, requests: list[Request]) -> list[TokenEvent]:
        """Prefill `requests` together into the rows after the running ones."""
        events, rows = [], []
        for r in requests:
            # A request whose generator cannot be made (e.g. a seed torch refuses) fails alone, before the
            # prefill, so its neighbours in this step never see the error.
            try:
                rows.append(_Row(r, make_generator(r.params, self.device), length=0))
            except (RuntimeError, ValueError, OverflowError, TypeError) as error:
                events.append(TokenEvent(r.request_id, None, True, f"error: {type(error).__name__}: {error}"))
        if not rows:
            return events
        requests = [row.request for row in rows]
        first_row = len(self._rows)
        longest = max(len(r.prompt_ids) for r in requests)
        pad = self.config.pad_token_id if isinstance(getattr(self.config, "pad_token_id", None), int) else 0
        input_ids = torch.tensor(
            [r.prompt_ids + [pad] * (longest - len(r.prompt_ids)) for r in requests], device=self.device
        )
        logits_BV = self._forward(first_row, rows, input_ids, [len(r.prompt_ids) for r in requests])
        for row, request in zip(rows, requests, strict=True):
            row.length = len(request.prompt_ids)
        self._rows.extend(rows)
        return events + self._emit(rows, logits_BV)

    def _decode(self, num_rows: int) -> list[TokenEvent]:
        rows = self._rows[:num_rows]
        input_ids = torch.tensor([[row.last_token] for row in rows], device=self.device)
        logits_BV = self._forward(0, rows, input_ids, [row.length + 1 for row in rows])
        for row in rows:
            row.length += 1
        return self._emit(rows, logits_BV)

    def _remove(self, request_id: str) -> None:
        """Free a row: the last running row moves into its place, so running rows stay rows 0..n-1."""
        index = next(i for i, row in enumerate(self._rows) if row.request.request_id == request_id)
        last = len(self._rows) - 1
        if index != last:
            self.cache.move_row(last, index)
            self._rows[index] = self._rows[last]
        self._rows.pop()

    def _choose(self, rows: list[_Row], logits_BV: torch.Tensor) -> list[int | str]:
        """Each row's next token, or the error that row alone raised (its neighbours still get their tokens, from
        the generator states they would have had without it)."""
        generators = [r.generator for r in rows]
        states = [g.get_state() if g is not None else None for g in generators]
        try:
            return choose_tokens(logits_BV, [r.request.params for r in rows], generators)
        except (RuntimeError, ValueError) as batch_error:
            logger.warning("sampling failed (%s); choosing row by row", batch_error)
        tokens: list[int | str] = []
        for b, (row, generator, state) in enumerate(zip(rows, generators, states, strict=True)):
            if generator is not None:
                generator.set_state(state)
            try:
                tokens.append(choose_tokens(logits_BV[b : b + 1], [row.request.params], [generator])[0])
            except (RuntimeError, ValueError) as error:
                tokens.append(f"error: {type(error).__name__}: {error}")
        return tokens

    def _emit(self, rows: list[_Row], logits_BV: torch.Tensor) -> list[TokenEvent]:
        tokens = self._choose(rows, logits_BV)
        events, finished = [], []
        for row, token in zip(rows, tokens, strict=True):
            if isinstance(token, str):  # this row's sampling failed: it ends alone, with the error
                events.append(TokenEvent(row.request.request_id, None, True, token))
                finished.append(row.request.request_id)
                continue
            row.last_token = token
            row.generated += 1
            params = row.request.params
            reason = None
            if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_ids):
                reason = "stop"
            elif row.generated >= params.max_new_tokens or row.length + 1 >= self.max_seq_len:
                reason = "length"
            if reason is not None:
                finished.append(row.request.request_id)
            events.append(TokenEvent(row.request.request_id, token, reason is not None, reason))
        for request_id in finished:
            self._remove(request_id)
        return events


def _dial_key(k: int | Mapping[int, int]) -> int | tuple[tuple[int, int], ...]:
    """A request's k as a hashable value (a per-layer dict becomes its sorted items)."""
    return tuple(sorted(k.items())) if isinstance(k, Mapping) else k


def _can_share(keys: list | tuple) -> bool:
    """Can rows at these ks run in one forward? The dial takes one k per row (a tensor) or one per-layer dict."""
    return len(set(keys)) <= 1 or all(isinstance(key, int) for key in keys)


@contextlib.contextmanager
def _experts_implementation(model, name: str):
    """Run with transformers' experts implementation `name` (the sparse "phds" path), restoring the model's own."""
    if not model._can_set_experts_implementation():
        # Llama 4's dense experts compute only routed rows while the engine runs (a model loaded that way stays so)
        already = {id(module) for module in model.modules() if "forward" in module.__dict__}
        apply_to_other_experts(model)
        try:
            yield
        finally:
            restore_other_experts(model, keep=already)
        return
    with _switched(model.config._experts_implementation, model.set_experts_implementation, name):
        yield


def _attention_implementation(model, name: str):
    """Run with transformers' attention implementation `name`, restoring the model's own (a cheap switch: it sets
    the configs' attribute)."""
    return _switched(model.config._attn_implementation, model.set_attn_implementation, name)


@contextlib.contextmanager
def _switched(saved: str, switch, name: str):
    """Within the block, `switch(name)` is in effect; `switch(saved)` restores it (nothing is switched when equal)."""
    if saved == name:
        yield
        return
    switch(name)
    try:
        yield
    finally:
        switch(saved)


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    return frozenset(ids)
