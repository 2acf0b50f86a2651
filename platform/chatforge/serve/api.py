"""The OpenAI chat-completions wire format: request and response models, and OpenAI-style errors.

Requests are validated here, before anything reaches a model: every field a client can get wrong becomes a 4xx
whose body is OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with ``param`` naming the field, so an
OpenAI client raises its usual ``BadRequestError``. Unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Annotated, Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

MAX_STOP_SEQUENCES = 4
# Every running sequence checks each new token against every prefix of every stop sequence, so a long stop string
# slows the whole replica's batch, not only its own request.
MAX_STOP_CHARS = 128
MAX_TOP_LOGPROBS = 20
M = TypeVar("M", bound=BaseModel)
log = logging.getLogger("chatforge.serve")


# ---------------------------------------------------------------- errors


class ApiError(Exception):
    """A request the API refuses: rendered as an OpenAI error body with this status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers or self.headers)


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "Missing or invalid API key: send `Authorization: Bearer <key>`.",
        code="invalid_api_key",
        type="authentication_error",
    )


RETRY_AFTER_S = 1


def overloaded() -> ApiError:
    return ApiError(
        503,
        "The model is overloaded: too many requests are waiting for it. Retry after a moment.",
        code="overloaded",
        type="server_error",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def unavailable() -> ApiError:
    return ApiError(
        503,
        "The model is not available (its replicas are starting or failed). Retry after a moment.",
        code="unavailable",
        type="server_error",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def completion_not_found(completion_id: str) -> ApiError:
    """Also the answer for another key's completion: whether it exists is not the caller's to know."""
    return ApiError(
        404,
        f"No completion with id '{completion_id}' (ids are the `id` of chat completion responses).",
        param="completion_id",
        code="completion_not_found",
        type="not_found_error",
    )


def already_rated(completion_id: str) -> ApiError:
    return ApiError(
        409,
        f"The completion '{completion_id}' has already been rated with this API key: a completion takes one rating "
        "per key.",
        param="completion_id",
        code="already_rated",
    )


def store_unavailable(message: str) -> ApiError:
    return ApiError(
        503, message, code="store_unavailable", type="server_error", headers={"Retry-After": str(RETRY_AFTER_S)}
    )


def timed_out(seconds: float) -> ApiError:
    return ApiError(
        503,
        f"The completion did not finish within the server's deadline of {seconds:g} s (queueing included): retry "
        "later or ask for fewer max_tokens.",
        code="timeout",
        type="server_error",
    )


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: tuple) -> str | None:
    """``("messages", 0, "content", "function-after[...]")`` -> ``messages.0.content`` (union member tags dropped)."""
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))]
    return ".".join(parts) or None


def from_validation_error(error: ValidationError | RequestValidationError) -> ApiError:
    """The first problem of a pydantic error as a 400 naming the field (``messages.0.role``)."""
    errors = error.errors()
    # A union (content: str | parts) reports one error per member: the deepest one is the informative one.
    same_field = [e for e in errors if e.get("loc", ())[:1] == errors[0].get("loc", ())[:1]]
    first = max(same_field, key=lambda e: len((_param(tuple(e.get("loc", ()))) or "").split(".")))
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first.get("msg", ""))
        return ApiError(400, f"The request body is not valid JSON: {detail}", code="invalid_json")
    param = _param(tuple(first.get("loc", ())))
    if kind == "model_type" and param is None:
        return ApiError(400, "The request body must be a JSON object.", code="invalid_type")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    count = len(error.errors())
    more = f" ({count - 1} more problem(s) in the request)" if count > 1 else ""
    return ApiError(400, f"Invalid value for '{param}': {message}{more}", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Every error FastAPI/Starlette would answer (404 route, 405, 422 validation) in OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, error: RequestValidationError) -> JSONResponse:
        return from_validation_error(error).response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error serving a request")
        return ApiError(500, "The server had an error while processing the request.", type="server_error").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return ApiError(error.status_code, str(error.detail), type=kind).response(headers=error.headers)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused with 413 once it passes ``max_bytes`` (before any parsing, without reading it all)."""
    declared = request.headers.get("content-length")
    too_large = ApiError(
        413, f"The request body is larger than the limit of {max_bytes} bytes.", code="request_too_large"
    )
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body.extend(piece)
        if len(body) > max_bytes:
            raise too_large
    return bytes(body)


def parse_body(model: type[M], raw: bytes) -> M:
    try:
        return model.model_validate_json(raw or b"")
    except ValidationError as error:
        raise from_validation_error(error) from None


# ---------------------------------------------------------------- requests


def _clean_text(value: str) -> str:
    # JSON can carry NUL and lone surrogates; neither tokenizers nor databases take them
    if "\x00" in value:
        raise ValueError("text must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it holds a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_clean_text)]


class _Request(BaseModel):
    # extra="ignore": OpenAI ignores fields it does not use (frequency_penalty, tools settings of other clients...)
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    model: Text | None = Field(None, description="a variant name pins it; absent or 'auto' lets the router choose")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Text | list[Text] | None = None
    user: Text | None = Field(None, max_length=256)
    seed: int | None = Field(None, ge=0, lt=2**63)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported, got {n}")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            longest = max(len(s) for s in stops)
            raise ValueError(f"stop sequences are at most {MAX_STOP_CHARS} characters, got one of {longest}")
        return stop

    def stop_sequences(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def plain_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def validate_choices(self) -> None:
        """Cross-field rules pydantic's per-field checks cannot express."""
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true.", param="top_logprobs", code="invalid_value")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream=true.", param="stream_options")


class FeedbackRequest(_Request):
    completion_id: Text = Field(min_length=1, max_length=128)
    rating: Literal[-1, 0, 1]
    correction: Text | None = Field(None, description="the answer the user would have wanted")
    comment: Text | None = None
    user: Text | None = Field(None, max_length=256, description="stored only as a keyed hash")

    def check_lengths(self, max_correction_chars: int, max_comment_chars: int) -> None:
        """The caps on free text (``serve.feedback.max_correction_chars`` / ``max_comment_chars``): a 400 naming
        the field and its limit."""
        for param, limit in (("correction", max_correction_chars), ("comment", max_comment_chars)):
            value = getattr(self, param)
            if value is not None and len(value) > limit:
                raise ApiError(
                    400,
                    f"Invalid value for '{param}': {len(value)} characters, the limit is {limit}.",
                    param=param,
                    code="string_too_long",
                )


# ---------------------------------------------------------------- responses


def logprobs_body(logprobs) -> dict[str, Any]:
    """Engine ``TokenLogprob``s as OpenAI's ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    return {
        "content": [
            {
                "token": item.token,
                "logprob": item.logprob,
                "bytes": list(item.token.encode("utf-8", "replace")),
                "top_logprobs": [
                    {"token": token, "logprob": value, "bytes": list(token.encode("utf-8", "replace"))}
                    for token, value in item.top
                ],
            }
            for item in logprobs
        ]
    }


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    completion_id: str,
    created: int,
    variant: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    logprobs=None,
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": variant,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs_body(logprobs) if logprobs is not None else None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_body(prompt_tokens, completion_tokens),
    }


def chunk_body(
    completion_id: str,
    created: int,
    variant: str,
    delta: dict[str, str],
    finish_reason: str | None = None,
    logprobs=None,
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": variant,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": logprobs_body(logprobs) if logprobs is not None else None,
                "finish_reason": finish_reason,
            }
        ],
    }


def usage_chunk_body(completion_id: str, created: int, variant: str, prompt: int, completion: int) -> dict[str, Any]:
    """The extra last chunk of ``stream_options.include_usage``: no choices, the usage counts."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": variant,
        "choices": [],
        "usage": usage_body(prompt, completion),
    }


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def models_body(variants: list[str], created: int | None = None) -> dict[str, Any]:
    created = int(created if created is not None else time.time())
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": created, "owned_by": "chatforge"} for name in variants],
    }
