"""From a validated OpenAI request to engine work and back: k resolution, limits, stop strings, metrics.

Every check that can fail happens in `prepare_*`, before anything reaches the engine, and fails with an `APIError`
(OpenAI's shape, right status). `generate` then streams `Piece`s: released text, the token it came with, and the
finish reason on the last one. Leaving `generate` early (a client that hung up) cancels the engine request at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from phds.dial import moe_layers, sparsity
from phds.loading import load
from phds.serving.autok import AutoKPolicy
from phds.serving.config import ServeConfig, resolve_ks, served_name
from phds.serving.detok import TextStream
from phds.serving.errors import APIError, bad_request, model_not_found, queue_full, shutting_down
from phds.serving.metrics import ServingMetrics
from phds.serving.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, new_id, now
from phds.serving.runner import EngineRunner
from phds.sidecar import check_default_k

logger = logging.getLogger(__name__)

AUTO = "auto"
SHUTTING_DOWN = "shutting_down"  # the finish reason the runner gives requests it ends at the drain bound


@dataclass(kw_only=True)
class Job:
    """One request, validated and tokenised, ready for the engine."""

    request_id: str
    endpoint: str  # "completions" | "chat"
    model: str  # the model name echoed back (as the client sent it)
    prompt_ids: list[int]
    k: int  # reported to the client; at an allocation, its largest per-layer k
    auto: bool
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    ignore_eos: bool
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    layer_ks: dict[int, int] | None = None  # the server's allocation: what the engine runs instead of `k`
    created: int = field(default_factory=now)
    admitted: bool = False  # holds one of the server's in-flight places (see `Service.admit` / `release`)


@dataclass
class Piece:
    """Newly released text; `finish_reason` is set on the last piece only."""

    text: str
    token_id: int | None = None
    finish_reason: str | None = None


@dataclass
class Outcome:
    """What a finished request produced."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class Service:
    """The serving logic of one loaded model; `phds.serving.app.create_app(service)` puts HTTP in front of it.

    Args:
        model, tokenizer: the loaded checkpoint (the engine drives `model`; the tokenizer is used here).
        runner: the `EngineRunner` stepping a `phds.engine.Engine` over `model`.
        ks: the declared ks; default_k: k of a request that names none.
        model_name: the name clients use.
        max_model_len: prompt plus completion tokens.
        max_batch, max_queue: in-flight requests beyond `max_batch + max_queue` are refused with a 503.
        auto_policy: enables `k: "auto"` (None refuses it).
        allocation: serve every request at this `{layer_index: k}` (`ServeConfig.allocation`); `ks` must then be
            `[max(allocation.values())]`, the k responses report. A request naming a k gets a 400.

    Example: `service = Service.from_config(ServeConfig(model="tiny:olmoe", k_set=[1, 2, 4]))`.
    """

    def __init__(
        self,
        *,
        model,
        tokenizer,
        runner: EngineRunner,
        ks: list[int],
        default_k: int,
        model_name: str,
        max_model_len: int,
        max_batch: int,
        max_queue: int,
        auto_policy: AutoKPolicy | None = None,
        allocation: dict[int, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if tokenizer is None:
            raise ValueError("`tokenizer` is required to serve text; the checkpoint has none")
        check_default_k(default_k, ks)
        if allocation is not None and (auto_policy is not None or ks != [max(allocation.values())]):
            raise ValueError(
                f"a Service at `allocation` {allocation} serves ks [{max(allocation.values())}] and no auto k, "
                f"got ks={ks}, auto_policy={auto_policy!r}"
            )
        self.allocation = allocation
        self.model, self.tokenizer, self.runner = model, tokenizer, runner
        self.ks, self.default_k, self.model_name = sorted(ks), default_k, model_name
        self.max_model_len, self.max_batch, self.max_queue = max_model_len, max_batch, max_queue
        self.auto_policy = auto_policy
        self.clock = clock
        self.metrics = ServingMetrics()
        self.in_flight = 0
        self.closing = False
        self.vocab_size = model.config.get_text_config().vocab_size
        if auto_policy is not None:
            self.metrics.auto_k_target_ms.set(auto_policy.target_ms)
        # Tokenising runs on one worker thread of its own (a fast tokenizer is not safe to call from two threads at
        # once), never on the event loop, so a long prompt delays no other client's answer.
        self._tokenizing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="phds-tokenize")
        # No token is longer than this many characters, so a text over `max_model_len * longest` characters is
        # over the context length whatever it tokenises to: refused before tokenising any of it.
        self.max_prompt_chars = max_model_len * _longest_token_chars(tokenizer)
        eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
        self.eos_token_ids = tuple(eos if isinstance(eos, list) else ([eos] if eos is not None else []))

    @classmethod
    def from_config(cls, config: ServeConfig) -> Service:
        """Load the checkpoint, resolve its ks, build the engine and its runner (not started yet)."""
        from phds.engine import Engine  # the decode engine; imported here so protocol-only users need no torch
        from phds.engine.threads import ThreadPolicy

        model, tokenizer = load(
            config.model, dtype=config.dtype, device=config.device, trust_remote_code=config.trust_remote_code
        )
        if config.allocation is not None:
            _check_allocation(model, config.allocation)
            ks = [max(config.allocation.values())]
            default_k = ks[0]
        else:
            ks, default_k = resolve_ks(model, config.k_set, config.default_k)
        max_model_len = config.max_model_len or model.config.get_text_config().max_position_embeddings
        threads = None
        if next(model.parameters()).device.type == "cpu":
            threads = ThreadPolicy(config.threads, adaptive=not config.compile)
        engine = Engine(
            model,
            tokenizer,
            max_batch_size=config.max_batch,
            max_seq_len=max_model_len,
            compile=config.compile,
            threads=threads,
        )
        policy = None
        if config.auto_target_ms is not None:
            policy = AutoKPolicy(ks=ks, target_ms=config.auto_target_ms, queue_step=config.auto_queue_step)
        name = config.served_model_name or served_name(config.model)
        return cls(
            model=model,
            tokenizer=tokenizer,
            runner=EngineRunner(engine),
            ks=ks,
            default_k=default_k,
            model_name=name,
            max_model_len=max_model_len,
            max_batch=config.max_batch,
            max_queue=config.max_queue,
            auto_policy=policy,
            allocation=config.allocation,
        )

    # ------------------------------------------------------------------------------------------- model listing

    def models(self) -> ModelList:
        """The model itself (at the default k), one entry per declared k (`NAME@k2`), and `NAME@auto` if enabled."""
        created = now()
        card = dict(created=created, ks=self.ks, max_model_len=self.max_model_len)
        cards = [ModelCard(id=self.model_name, k=self.default_k, **card)]
        if self.allocation is not None:  # one operating point: no NAME@k entries
            return ModelList(data=cards)
        cards += [ModelCard(id=f"{self.model_name}@k{k}", k=k, **card) for k in self.ks]
        if self.auto_policy is not None:
            cards.append(ModelCard(id=f"{self.model_name}@{AUTO}", k=AUTO, **card))
        return ModelList(data=cards)

    def resolve_k(self, model: str, k: int | str | None) -> tuple[int, bool]:
        """(k, is_auto) from the model name (NAME, NAME@k2, NAME@auto) and the body's `k`."""
        name, _, suffix = model.partition("@")
        if name != self.model_name:
            raise model_not_found(model, self.model_name)
        from_name: int | str | None = None
        if suffix:
            if suffix == AUTO:
                from_name = AUTO
            elif re.fullmatch(r"k[0-9]{1,6}", suffix):  # ASCII digits only: `str.isdigit` also takes "²"
                from_name = int(suffix[1:])
            else:  # the model exists; the request names it wrongly
                raise bad_request(
                    f"`model` {model!r} has a malformed suffix: use {self.model_name}@k<ASCII digits> or "
                    f"{self.model_name}@auto",
                    "model",
                )
        if self.allocation is not None and (from_name is not None or k is not None):
            named = k if k is not None else from_name
            raise bad_request(
                f"`k`={named!r}: this server runs every request at the per-layer allocation {self.allocation} "
                f"(`phds serve --allocation`); send no `k` and call the model {self.model_name!r} without a suffix",
                "k",
                "k_fixed",
            )
        if from_name is not None and k is not None and from_name != k:
            raise bad_request(f"`k` is {k!r} in the body but {from_name!r} in the model name {model!r}", "k")
        wanted = k if k is not None else from_name
        if wanted == AUTO:
            if self.auto_policy is None:
                raise bad_request("`k`='auto' needs a server started with --auto-target-ms", "k", "auto_k_disabled")
            return self.auto_policy.choose(queue_depth=self.queue_depth()), True
        if wanted is None:
            return self.default_k, False
        if wanted not in self.ks:
            raise bad_request(
                f"`k`={wanted} is not declared by this checkpoint; allowed values: {self.ks}"
                + (" or 'auto'" if self.auto_policy is not None else ""),
                "k",
                "k_not_declared",
            )
        return int(wanted), False

    def queue_depth(self) -> int:
        """Requests in flight that do not fit in the running batch."""
        return max(0, self.in_flight - self.max_batch)

    # ------------------------------------------------------------------------------------------- preparation

    async def prepare_off_loop(self, prepare: Callable, request) -> Job:
        """Run `prepare(request)` (`prepare_completion` / `prepare_chat`) on the tokenising thread."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, prepare, request)

    def _check_prompt_size(self, *, tokens: int | None = None, chars: int | None = None) -> None:
        """Refuse a prompt over the context length, from its token count or (before tokenising) its length."""
        if tokens is not None and tokens >= self.max_model_len:
            size = f"{tokens} tokens"
        elif chars is not None and chars > self.max_prompt_chars:
            size = f"{chars} characters (no text over {self.max_prompt_chars} fits)"
        else:
            return
        raise bad_request(
            f"the prompt has {size}; this model's maximum context length is {self.max_model_len} tokens "
            "(prompt plus completion)",
            "prompt",
            "context_length_exceeded",
        )

    def prepare_completion(self, request: CompletionRequest) -> Job:
        """Validate and tokenise a completions request (special tokens added, as the tokenizer does by default)."""
        if isinstance(request.prompt, str):
            self._check_prompt_size(chars=len(request.prompt))
            prompt_ids = self.tokenizer(request.prompt, add_special_tokens=True).input_ids
        else:
            prompt_ids = list(request.prompt)
            self._check_prompt_size(tokens=len(prompt_ids))
            bad = [i for i in prompt_ids if not 0 <= i < self.vocab_size]
            if bad:
                raise bad_request(f"`prompt` token ids must be in [0, {self.vocab_size}), got {bad[:5]}", "prompt")
        return self._job("completions", request, prompt_ids, request.max_tokens)

    def prepare_chat(self, request: ChatCompletionRequest) -> Job:
        """Validate a chat request and render it with the tokenizer's chat template (generation prompt added)."""
        messages = []
        try:
            for message in request.messages:
                messages.append({**(message.model_extra or {}), "role": message.role, "content": message.text()})
        except ValueError as error:
            raise bad_request(str(error), "messages") from error
        self._check_prompt_size(chars=sum(len(m["content"]) for m in messages))
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except ValueError as error:
            raise bad_request(str(error), "messages") from error
        except Exception as error:  # jinja errors from the template (e.g. a role it refuses)
            raise bad_request(f"the chat template refused `messages`: {error}", "messages") from error
        # The template already holds any special tokens it wants (BOS, role markers).
        prompt_ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return self._job("chat", request, prompt_ids, request.limit())

    def _job(self, endpoint: str, request, prompt_ids: list[int], max_tokens: int | None) -> Job:
        if self.closing:
            raise shutting_down()
        k, auto = self.resolve_k(request.model, request.k)  # 404 / 400 for the model and k come first
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise bad_request(
                f"the prompt has {len(prompt_ids)} tokens; this model's maximum context length is "
                f"{self.max_model_len} (prompt plus completion)",
                "prompt",
                "context_length_exceeded",
            )
        if max_tokens is not None and max_tokens > room:
            raise bad_request(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds this "
                f"model's maximum context length {self.max_model_len}",
                "max_tokens",
                "context_length_exceeded",
            )
        return Job(
            request_id=new_id("cmpl" if endpoint == "completions" else "chatcmpl"),
            endpoint=endpoint,
            model=request.model,
            prompt_ids=prompt_ids,
            k=k,
            auto=auto,
            max_new_tokens=max_tokens if max_tokens is not None else room,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            ignore_eos=request.ignore_eos,
            stop=list(request.stop),
            stream=request.stream,
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
            return_token_ids=request.return_token_ids,
            layer_ks=self.allocation,
        )

    # ------------------------------------------------------------------------------------------- generation

    def admit(self, job: Job) -> None:
        """Take one of the `max_batch + max_queue` in-flight places for `job`, or refuse with a 503.

        Check and take happen together, with no `await` between them, so a simultaneous burst cannot overshoot
        the limit; the place is given back by `release` (which `generate` calls when it ends).
        """
        if self.closing:
            raise shutting_down()
        if not self.runner.alive:
            raise APIError(503, "The decode engine is not running.", type="overloaded_error", code="engine_down")
        if self.in_flight >= self.max_batch + self.max_queue:
            raise queue_full(retry_after_s=1)
        if not job.admitted:
            job.admitted = True
            self.in_flight += 1
            self.metrics.queue_depth.set(self.queue_depth())

    def release(self, job: Job) -> None:
        """Give back `job`'s in-flight place (idempotent: also for a job whose generation never started)."""
        if job.admitted:
            job.admitted = False
            self.in_flight -= 1
            self.metrics.queue_depth.set(self.queue_depth())

    async def generate(self, job: Job) -> AsyncIterator[Piece]:
        """Run `job` on the engine; yield text as it is released. Takes an in-flight place unless `admit` did."""
        from phds.engine import Request, SamplingParams

        params = SamplingParams(
            max_new_tokens=job.max_new_tokens,
            temperature=job.temperature,
            top_p=job.top_p,
            seed=job.seed,
            ignore_eos=job.ignore_eos,
            stop_token_ids=() if job.ignore_eos else self.eos_token_ids,
        )
        k = job.layer_ks if job.layer_ks is not None else job.k
        request = Request(request_id=job.request_id, prompt_ids=job.prompt_ids, k=k, params=params)
        label = str(job.k)
        if job.auto:
            self.metrics.auto_k_chosen.labels(k=label).inc()
        arrived = self.clock()
        first = last = None
        count = 0
        done = False
        ended: str | None = None  # the error code when the engine side ended the request
        if not job.admitted:
            self.admit(job)
        text = TextStream(self.tokenizer, job.stop)
        try:
            events = self.runner.submit(request)
            while not done:
                event = await events.get()
                piece = Piece("", event.token_id)
                if event.token_id is not None:
                    last = self.clock()
                    first = first if first is not None else last
                    count += 1
                    piece.text = text.push(event.token_id)
                if text.stopped:  # a stop string: end here and free the slot now
                    self.runner.cancel(job.request_id)
                    piece.finish_reason, done = "stop", True
                elif event.finished:
                    try:
                        piece.finish_reason = _finish_reason(event)
                    except APIError as error:
                        ended = error.code  # "shutting_down" or "engine_error"
                        raise
                    done = True
                    piece.text += text.finish()
                if event.token_id is not None or done:
                    yield piece
        finally:
            self.release(job)
            self.metrics.running.set(self.runner.num_running)
            if not done:  # the client hung up (task cancelled), the consumer stopped early, or the engine failed it
                self.runner.cancel(job.request_id)
                if ended == "engine_error":
                    self.metrics.failed.labels(reason="engine_error").inc()
                else:
                    reason = "shutdown" if ended == "shutting_down" or self.closing else "client_disconnected"
                    self.metrics.cancelled.labels(reason=reason).inc()
            self._record(job, label, arrived, first, last, count, done)

    async def complete(self, job: Job) -> Outcome:
        """Run `job` to the end and collect it (non-streaming)."""
        outcome = Outcome()
        async for piece in self.generate(job):
            outcome.text += piece.text
            if piece.token_id is not None:
                outcome.token_ids.append(piece.token_id)
            outcome.finish_reason = piece.finish_reason or outcome.finish_reason
        return outcome

    def _record(
        self, job: Job, label: str, arrived: float, first: float | None, last: float | None, count: int, done: bool
    ) -> None:
        self.metrics.prompt_tokens.labels(k=label).inc(len(job.prompt_ids))
        self.metrics.generation_tokens.labels(k=label).inc(count)
        if first is not None:
            self.metrics.time_to_first_token.labels(k=label).observe(first - arrived)
            self.metrics.request_latency.labels(k=label).observe(last - arrived)
        if count > 1:
            per_token_s = (last - first) / (count - 1)
            self.metrics.time_per_output_token.labels(k=label).observe(per_token_s)
            if self.auto_policy is not None and done:
                self.auto_policy.observe(job.k, per_token_s * 1000)
                latency = self.auto_policy.latency_ms(job.k)
                if latency is not None:
                    self.metrics.auto_k_latency_ms.labels(k=label).set(latency)

    def health(self) -> dict:
        """What `GET /health` answers: status, the served ks and the current load."""
        return {
            "status": "draining" if self.closing else ("ok" if self.runner.alive else "engine down"),
            "model": self.model_name,
            "ks": self.ks,
            "default_k": self.default_k,
            "allocation": None if self.allocation is None else {str(i): k for i, k in self.allocation.items()},
            "running": self.runner.num_running,
            "in_flight": self.in_flight,
            "queue_depth": self.queue_depth(),
        }


def _check_allocation(model, allocation: dict[int, int]) -> None:
    """Refuse, before serving anything, an allocation the model cannot run (the dial's own checks)."""
    indices = sorted(layer.index for layer in moe_layers(model))
    if sorted(allocation) != indices:
        raise ValueError(
            f"`allocation` names layers {sorted(allocation)} but the model's MoE layers are {indices}; allocate "
            "for this model with `phds allocate`"
        )
    with sparsity(model, allocation):  # raises ValueError for a k the model cannot take; restores the model
        pass


def _finish_reason(event) -> str:
    reason = event.finish_reason or "stop"
    if reason == SHUTTING_DOWN:  # the drain bound passed (`EngineRunner.abort_all`)
        raise shutting_down()
    if reason.startswith("error"):
        raise APIError(500, f"the engine failed: {reason}", type="internal_error", code="engine_error")
    return reason


def _longest_token_chars(tokenizer) -> int:
    """The most characters one token of `tokenizer` decodes to (at least 1; byte-level and sentencepiece markers
    count as one character each, as the text they stand for does)."""
    return max((len(piece) for piece in tokenizer.get_vocab()), default=1) or 1
