"""The wire format: OpenAI's request and response bodies (pydantic), plus our extras such as `k`.

Every field has a description. The fields both endpoints share live in `_SamplingFields`: OpenAI's (in
alphabetical order), then ours, marked `extras`; each request class adds its own OpenAI fields. Pydantic lists a
base class's fields first, so a request's schema reads: the shared OpenAI fields, our extras (`k`, `ignore_eos`,
`return_token_ids`), then the endpoint's own OpenAI fields (`model`, `prompt` / `messages`, ...). Validation that needs no model (types, ranges, `n=1`) lives here, so a bad body is answered with a
400 before any model work; checks that need the served model (k declared, prompt length) live in the service.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from phds.sidecar import check_k

# A k in a request: experts per token, or "auto" for load-adaptive sparsity. Strict, so `true` is not k=1.
KField = StrictInt | Literal["auto"] | None

# torch seeds a generator with a 64-bit integer; a request's seed must be a signed one (OpenAI's and vLLM's range).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1

_K_DESCRIPTION = (
    "Experts per token for this request (one of the checkpoint's declared ks), or 'auto' to let the server pick "
    "the largest declared k whose recent per-token latency meets its --auto-target-ms under the current load. "
    "Defaults to the model-name suffix (NAME@k2, NAME@auto), else the checkpoint's default k."
)


class _Body(BaseModel):
    # OpenAI answers an unknown argument with a 400 rather than ignoring it; so do we (a typo such as `K` would
    # otherwise silently run at the default k).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="after")
    def _valid_unicode(self):
        # JSON may carry lone surrogates (`"\ud800"`), which no tokenizer can encode: refuse them here, naming the
        # field, rather than failing later inside the tokenizer or the chat template.
        where = _lone_surrogate(self.model_dump(), "")
        if where is not None:
            raise ValueError(f"`{where}` must be valid Unicode text (it holds a lone surrogate code point)")
        return self


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The dotted path of the first string under `value` that is not encodable as UTF-8, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(key, path) if isinstance(key, str) else None
        found = found or _lone_surrogate(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


class StreamOptions(_Body):
    include_usage: bool = Field(False, description="Send one last chunk carrying `usage` before [DONE].")


class _SamplingFields(_Body):
    """The sampling fields shared by completions and chat completions."""

    frequency_penalty: float = Field(0.0, description="Only 0 is supported.")
    n: int = Field(1, description="Number of choices; only 1 is supported.")
    presence_penalty: float = Field(0.0, description="Only 0 is supported.")
    seed: int | None = Field(
        None, ge=SEED_MIN, le=SEED_MAX, description="Seed for sampling (temperature > 0), a signed 64-bit integer."
    )
    stop: str | list[str] | None = Field(
        None,
        validate_default=True,
        description="Up to 4 strings; generation stops before the first one, which is not returned.",
    )
    stream: bool = Field(False, description="Stream the answer as server-sent events ending in `data: [DONE]`.")
    stream_options: StreamOptions | None = Field(None, description="Options for streaming (`include_usage`).")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    user: str | None = Field(None, description="Accepted and ignored.")
    # -- extras (not in OpenAI's API) --
    k: KField = Field(None, description=_K_DESCRIPTION)
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token (benchmarks).")
    return_token_ids: bool = Field(
        False, description="Also return `prompt_token_ids` and each choice's `token_ids` (the vLLM extra)."
    )

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"`n` must be 1 (one choice per request), got {n}")
        return n

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalties(cls, value: float, info) -> float:
        if value != 0.0:
            raise ValueError(f"`{info.field_name}` must be 0 (penalties are not supported), got {value}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError(f"`stop` must be at most 4 non-empty strings, got {stop!r}")
        return stops

    @field_validator("k")
    @classmethod
    def _positive_k(cls, k: KField) -> KField:
        # only a k the request names is checked here; whether this checkpoint declares it, the service says
        return k if k is None or k == "auto" else check_k(k)


class CompletionRequest(_SamplingFields):
    """`POST /v1/completions`."""

    model: str = Field(..., description="NAME, NAME@k<k> (e.g. NAME@k2) or NAME@auto; see GET /v1/models.")
    prompt: str | list[int] | list[str] = Field(..., description="One prompt: a string or a list of token ids.")
    echo: bool = Field(False, description="Only false is supported.")
    logprobs: int | None = Field(None, description="Not supported; must be null.")
    max_tokens: int = Field(16, ge=1, description="Most tokens to generate.")
    suffix: str | None = Field(None, description="Not supported; must be null.")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[int] | list[str]) -> str | list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError(f"`prompt` must be one prompt, got a list of {len(prompt)}")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("`prompt` must not be empty")
        return prompt

    @field_validator("echo", "logprobs", "suffix")
    @classmethod
    def _unsupported(cls, value: Any, info) -> Any:
        if value not in (None, False):
            raise ValueError(f"`{info.field_name}` is not supported, got {value!r}")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: passed through to the chat template

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message text; content parts other than text are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"`messages` content parts must be of type 'text', got {part.get('type')!r}")
            parts.append(part.get("text", ""))
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(..., min_length=1, description="The conversation so far.")
    model: str = Field(..., description="NAME, NAME@k<k> (e.g. NAME@k2) or NAME@auto; see GET /v1/models.")
    logprobs: bool = Field(False, description="Not supported; must be false.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    max_tokens: int | None = Field(None, ge=1, description="Deprecated alias of max_completion_tokens.")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool) -> bool:
        if value:
            raise ValueError("`logprobs` is not supported, got True")
        return value

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---------------------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Choice(BaseModel):
    index: int = 0
    logprobs: None = None
    finish_reason: str | None
    token_ids: list[int] | None = Field(None, description="Generated token ids (with return_token_ids).")


class _Response(BaseModel):
    id: str
    created: int
    model: str
    k: int = Field(..., description="Experts per token this request ran at.")
    prompt_token_ids: list[int] | None = Field(None, description="Prompt token ids (with return_token_ids).")


class CompletionChoice(_Choice):
    text: str


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    message: AssistantMessage


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    k: int


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    k: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "phds"
    k: int | Literal["auto"] = Field(..., description="The k a request naming this model runs at.")
    ks: list[int] = Field(..., description="The declared ks of the checkpoint.")
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
