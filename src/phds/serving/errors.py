"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status."""

from __future__ import annotations

from dataclasses import dataclass, field

from phds.serving.protocol import ErrorInfo, ErrorResponse


@dataclass
class APIError(Exception):
    """An error the server answers with instead of a completion.

    Example: `raise APIError(400, "k=3 is not declared; allowed: [1, 2, 4]", param="k")`.
    """

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str, served: str) -> APIError:
    return APIError(
        404,
        f"The model {model!r} does not exist; this server serves {served!r} (see GET /v1/models).",
        type="not_found_error",
        param="model",
        code="model_not_found",
    )


def queue_full(retry_after_s: int) -> APIError:
    return APIError(
        503,
        "The server's queue is full; retry later.",
        type="overloaded_error",
        code="queue_full",
        headers={"Retry-After": str(retry_after_s)},
    )


def unauthorized() -> APIError:
    return APIError(
        401,
        "Missing or wrong API key (send `Authorization: Bearer <key>`).",
        type="authentication_error",
        code="invalid_api_key",
    )


def shutting_down() -> APIError:
    return APIError(
        503,
        "The server is shutting down.",
        type="overloaded_error",
        code="shutting_down",
        headers={"Retry-After": "5"},
    )


def body_too_large(limit_bytes: int) -> APIError:
    return APIError(
        413,
        f"The request body is larger than this server's limit of {limit_bytes} bytes (--max-body-mb).",
        code="request_too_large",
    )
