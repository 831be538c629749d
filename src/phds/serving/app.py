"""The HTTP layer: FastAPI routes for OpenAI's completions, chat completions and models, SSE, health and metrics.

Handlers stay thin: validate (pydantic, then `Service.prepare_*`), admit, run, shape the answer. Errors of every kind
leave as OpenAI's `{"error": {...}}` with the right status. A non-streaming request races its generation against
the client's disconnect; a streaming one is cancelled by Starlette when the client goes, and either way the
engine request is cancelled at once (the `finally` in `Service.generate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from phds.serving.errors import APIError, body_too_large, unauthorized
from phds.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    Delta,
    Usage,
)
from phds.serving.service import Job, Outcome, Service

logger = logging.getLogger(__name__)


DEFAULT_MAX_BODY_BYTES = 4 * 2**20  # `ServeConfig.max_body_mb`'s default


class _BodyLimit:
    """ASGI middleware: read a request's body (at most `limit` bytes) before the app sees it; a larger one, by its
    Content-Length or by what actually arrives (chunked bodies have none), is answered with a 413 at once."""

    def __init__(self, app, *, limit: int, refused) -> None:
        self.app, self.limit, self.refused = app, limit, refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks, size, more = [], 0, not too_large
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away mid-body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            too_large = size > self.limit
            if too_large:
                break
        if too_large:
            return await self.refused(self.limit)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then the disconnect, when it comes

        await self.app(scope, replay, send)


def create_app(
    service: Service, *, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> FastAPI:
    """A FastAPI app serving `service`; its lifespan starts and stops the engine thread.

    Example: `uvicorn.run(create_app(Service.from_config(config)), host="127.0.0.1", port=8000)`.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if not service.runner.alive:
            service.runner.start()
        yield
        # uvicorn has already waited (up to its graceful-shutdown timeout) for in-flight requests; cancel the rest.
        service.closing = True
        service.runner.stop()

    app = FastAPI(
        title="phds serve",
        summary="OpenAI-compatible server with per-request experts per token (k)",
        lifespan=lifespan,
    )
    app.state.service = service

    def error_response(error: APIError) -> JSONResponse:
        service.metrics.errors.labels(type=error.type, status=str(error.status)).inc()
        return JSONResponse(error.body().model_dump(), status_code=error.status, headers=error.headers)

    app.add_middleware(_BodyLimit, limit=max_body_bytes, refused=lambda limit: error_response(body_too_large(limit)))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(error))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(APIError(error.status_code, str(error.detail), type=kind))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error answering %s", request.url.path)
        # the exception text stays in the server log: it may describe internals a client should not see
        return error_response(
            APIError(500, f"internal error ({type(error).__name__}); see the server log", type="internal_error")
        )

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise unauthorized()

    @app.get("/health")
    async def health() -> dict:
        return service.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        service.metrics.running.set(service.runner.num_running)
        service.metrics.queue_depth.set(service.queue_depth())
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict:
        return service.models().model_dump()

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request):
        job = await service.prepare_off_loop(service.prepare_completion, body)
        return await _answer(service, job, request)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        job = await service.prepare_off_loop(service.prepare_chat, body)
        return await _answer(service, job, request)

    return app


class _Stream(StreamingResponse):
    """A stream that gives its job's in-flight place back even when its body never starts (client gone first)."""

    def __init__(self, service: Service, job: Job) -> None:
        super().__init__(_sse(service, job), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.service, self.job = service, job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.service.release(self.job)


async def _answer(service: Service, job: Job, request: Request):
    service.admit(job)  # takes the place now: no await between the limit check and the count
    if job.stream:
        return _Stream(service, job)
    try:
        outcome = await _unless_disconnected(service.complete(job), request)
    finally:
        service.release(job)  # a job cancelled before its generation started still holds its place
    if outcome is None:
        return Response(status_code=499)  # nobody is listening; the engine request was cancelled
    service.metrics.requests.labels(k=str(job.k), endpoint=job.endpoint, finish_reason=outcome.finish_reason).inc()
    return _full_response(job, outcome).model_dump()


async def _unless_disconnected(work, request: Request) -> Outcome | None:
    """Await `work` unless the client hangs up first; then cancel it (which cancels the engine request)."""
    task = asyncio.ensure_future(work)

    async def hang_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(hang_up())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()


def _usage(job: Job, completion_tokens: int) -> Usage:
    prompt = len(job.prompt_ids)
    return Usage(prompt_tokens=prompt, completion_tokens=completion_tokens, total_tokens=prompt + completion_tokens)


def _full_response(job: Job, outcome: Outcome) -> CompletionResponse | ChatCompletionResponse:
    common = dict(
        id=job.request_id,
        created=job.created,
        model=job.model,
        k=job.k,
        usage=_usage(job, len(outcome.token_ids)),
        prompt_token_ids=job.prompt_ids if job.return_token_ids else None,
    )
    ids = outcome.token_ids if job.return_token_ids else None
    if job.endpoint == "chat":
        choice = ChatChoice(
            message=AssistantMessage(content=outcome.text), finish_reason=outcome.finish_reason, token_ids=ids
        )
        return ChatCompletionResponse(choices=[choice], **common)
    choice = CompletionChoice(text=outcome.text, finish_reason=outcome.finish_reason, token_ids=ids)
    return CompletionResponse(choices=[choice], **common)


def _data(model) -> str:
    payload = model if isinstance(model, dict) else model.model_dump()
    return f"data: {json.dumps(payload)}\n\n"


async def _sse(service: Service, job: Job):
    """Server-sent events: one chunk per released piece, then (optionally) usage, then `[DONE]`."""
    common = dict(id=job.request_id, created=job.created, model=job.model, k=job.k)
    chat = job.endpoint == "chat"
    count = 0
    finish = None
    try:
        if chat:  # OpenAI opens a chat stream with the role
            yield _data(
                ChatCompletionChunk(choices=[ChatChunkChoice(delta=Delta(role="assistant", content=""))], **common)
            )
        async for piece in service.generate(job):
            count += piece.token_id is not None
            finish = piece.finish_reason
            ids = [piece.token_id] if job.return_token_ids and piece.token_id is not None else None
            if not (piece.text or piece.finish_reason or ids):
                continue
            if chat:
                choice = ChatChunkChoice(
                    delta=Delta(content=piece.text or None), finish_reason=piece.finish_reason, token_ids=ids
                )
                yield _data(ChatCompletionChunk(choices=[choice], **common))
            else:
                choice = CompletionChoice(text=piece.text, finish_reason=piece.finish_reason, token_ids=ids)
                yield _data(CompletionChunk(choices=[choice], **common))
        service.metrics.requests.labels(k=str(job.k), endpoint=job.endpoint, finish_reason=finish).inc()
        if job.include_usage:
            chunk_type = ChatCompletionChunk if chat else CompletionChunk
            yield _data(chunk_type(choices=[], usage=_usage(job, count), **common))
    except APIError as error:  # the status line is gone; report in-band, as OpenAI does
        service.metrics.errors.labels(type=error.type, status=str(error.status)).inc()
        yield _data(error.body())
    except Exception as error:  # an unexpected failure still ends the stream in-band rather than cutting it
        logger.exception("unexpected error streaming %s", job.request_id)
        internal = APIError(500, f"internal error ({type(error).__name__}); see the server log", type="internal_error")
        service.metrics.errors.labels(type=internal.type, status="500").inc()
        yield _data(internal.body())
    yield "data: [DONE]\n\n"


def _validation_error(error: RequestValidationError) -> APIError:
    first = error.errors()[0] if error.errors() else {}
    if first.get("type") == "json_invalid":
        return APIError(400, f"The body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    if param:
        message = f"`{param}`: {message}"
    if param and "input" in first and first.get("type") not in ("missing", "model_attributes_type"):
        message += f" (got {first['input']!r})"[:300]
    return APIError(400, message, param=param, code=first.get("type"))
