"""OpenAI-compatible endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``
(streaming and not) and ``GET /v1/models``, so the ``openai`` SDK and curl scripts
work unchanged.

These requests travel through the bus like any other: each gets a request id
(returned in the ``X-Request-Id`` header and as ``id``), is produced to
``tokenbus.requests``, and is read back through the relay, so it is in the log and
can be replayed at ``/v1/requests/{id}/events``. This module is the one place
that knows OpenAI's wire shapes.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from relay.strict import GuardTimeout
from relay.subscription import subscribe_events
from schemas import (
    ErrorCode,
    FailedEvent,
    FinishedEvent,
    FinishReason,
    GenerationRequest,
    ModerationMode,
    SamplingParams,
    StartedEvent,
    StreamEvent,
    TokenEvent,
    uuid7,
)
from schemas.requests import ANY_MODEL, MAX_PROMPT_CHARS, ChatMessage

from .access import Caller
from .errors import ApiError, describe, json_body
from .sse_response import SseResponse
from .streaming import open_stream, stream_response
from .submit_routes import accept, caller

router = APIRouter()

# Parameters of the OpenAI API that tokenbus does not implement: refused with a
# reason rather than silently ignored.
_UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "logit_bias",
                "response_format", "logprobs", "top_logprobs", "suffix", "audio", "modalities",
                "prediction", "best_of")  # fmt: skip
_FINISH_REASONS = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.CANCELLED: "stop",  # OpenAI has no word for it; the event log keeps the truth
    FinishReason.EXPIRED: "stop",
    FinishReason.CONTENT_FILTER: "content_filter",  # OpenAI's own value
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = ANY_MODEL
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # an extension, as in vLLM
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # An extension. Unset: a streaming request is cancelled when its client closes
    # the connection (as vLLM does: nobody is left to read it), a whole one is not.
    cancel_on_disconnect: bool | None = None
    # An extension: the guard's mode for this request; unset, the tenant's default.
    moderation: ModerationMode | None = None

    @property
    def cancels_on_disconnect(self) -> bool:
        return self.stream if self.cancel_on_disconnect is None else self.cancel_on_disconnect

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        # Zero is a value, not an absence: 0 goes on to be refused, as the native
        # API refuses it, rather than replaced by the default.
        max_tokens = next(
            (n for n in (self.max_completion_tokens, self.max_tokens) if n is not None),
            default_max_tokens,
        )
        given: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
        }
        return SamplingParams(**{k: v for k, v in given.items() if v is not None})

    def check_supported(self) -> None:
        extra = self.model_extra or {}
        for name in _UNSUPPORTED:
            if extra.get(name) not in (None, False, [], {}, {"type": "text"}):
                raise _invalid(f"'{name}' is not supported by tokenbus", param=name)
        if self.n != 1:
            raise _invalid("only n=1 is supported", param="n")


class _ContentPart(BaseModel):
    type: Literal["text"]
    text: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class _ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | list[_ContentPart]

    def plain(self) -> ChatMessage:
        text = (
            self.content
            if isinstance(self.content, str)
            else "".join(part.text for part in self.content)
        )
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=text)


class ChatCompletionBody(_OpenAIBody):
    messages: list[_ChatMessage] = Field(min_length=1)


class CompletionBody(_OpenAIBody):
    prompt: str | list[str]
    echo: bool = False

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise _invalid("exactly one prompt is supported", param="prompt")
        return self.prompt[0]


# OpenAI answers bad input 400 with the first problem; read strictly (`json_body`).
_chat_body = json_body(ChatCompletionBody, status=400, first_only=True)
_completion_body = json_body(CompletionBody, status=400, first_only=True)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    request: Request,
    caller: Annotated[Caller, Depends(caller)],
    body: Annotated[ChatCompletionBody, Depends(_chat_body)],
) -> JSONResponse | SseResponse:
    messages = []
    for i, message in enumerate(body.messages):
        try:
            messages.append(message.plain())
        except ValidationError as exc:  # joined parts longer than a message may be
            raise _invalid(f"messages.{i}.{_first_error(exc)}", param=f"messages.{i}") from None
    return await _complete(request, caller, body, "chat", messages=messages, prompt=None)


@router.post("/v1/completions", response_model=None)
async def completions(
    request: Request,
    caller: Annotated[Caller, Depends(caller)],
    body: Annotated[CompletionBody, Depends(_completion_body)],
) -> JSONResponse | SseResponse:
    if body.echo:
        raise _invalid("echo is not supported", param="echo")
    return await _complete(request, caller, body, "text", messages=None, prompt=body.text())


@router.get("/v1/models")
async def models(request: Request, caller: Annotated[Caller, Depends(caller)]) -> dict[str, Any]:
    names = [ANY_MODEL, *sorted(request.state.hub.models_seen)]
    return {
        "object": "list",
        "data": [{"id": n, "object": "model", "created": 0, "owned_by": "tokenbus"} for n in names],
    }


async def _complete(
    request: Request,
    caller: Caller,
    body: _OpenAIBody,
    kind: Literal["chat", "text"],
    *,
    messages: list[ChatMessage] | None,
    prompt: str | None,
) -> JSONResponse | SseResponse:
    body.check_supported()
    try:
        generation = GenerationRequest(
            request_id=uuid7(),
            tenant=caller.tenant,
            model=body.model,
            messages=messages,
            prompt=prompt,
            sampling=body.sampling(default_max_tokens=256 if kind == "chat" else 16),
            submitted_at=_now(),
            cancel_on_disconnect=body.cancels_on_disconnect,
            moderation=body.moderation,
            metadata={"api": f"openai.{kind}"} | ({"user": body.user[:512]} if body.user else {}),
        )
    except ValidationError as exc:
        raise _invalid(_first_error(exc)) from None
    headers = {"X-Request-Id": str(generation.request_id)}
    shape = _Shape(kind, generation.request_id, body.model)
    if not body.stream:
        generation = await accept(request, caller, generation)
        try:
            return await _whole(_events(request, generation), shape, headers)
        except GuardTimeout as exc:
            raise ApiError(
                503, "guard_unavailable", f"{exc}: a strict request fails closed",
                {"Retry-After": "5"},
            ) from None  # fmt: skip
    # The native stream's treatment (limits, send timeout, cancel_on_disconnect),
    # through the same helper; the stream's slot is taken before anything is
    # submitted, so a 429 leaves nothing running.
    release = open_stream(request, caller)
    try:
        generation = await accept(request, caller, generation)
    except BaseException:
        release()
        raise
    events = _events(request, generation)
    usage = body.stream_options is not None and body.stream_options.include_usage
    return stream_response(
        request,
        generation.request_id,
        _chunks(events, shape, include_usage=usage),
        release,
        cancel_on_disconnect=body.cancels_on_disconnect,
        headers=headers,
    )


class _Shape:
    """OpenAI's response and chunk shapes for one request."""

    def __init__(self, kind: Literal["chat", "text"], request_id: uuid.UUID, model: str) -> None:
        self.kind = kind
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id.hex}"
        self.created = int(time.time())
        self.model = model

    def envelope(self, *, chunk: bool) -> dict[str, Any]:
        if self.kind == "chat":
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def choice(
        self, text: str | None, finish: str | None, *, chunk: bool, first: bool = False
    ) -> dict[str, Any]:
        if self.kind == "text":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if chunk:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        message = {"role": "assistant", "content": text or ""}
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}


def _usage(finished: FinishedEvent) -> dict[str, int]:
    u = finished.usage
    total = u.prompt_tokens + u.completion_tokens
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": total}  # fmt: skip


def _events(request: Request, generation: GenerationRequest) -> AsyncIterator[StreamEvent]:
    state = request.state
    strict = generation.moderation == ModerationMode.STRICT
    return subscribe_events(
        state.hub, state.log, generation.request_id,
        strict=state.verdicts if strict else None,
        strict_wait_s=state.server_settings.strict_wait_s,
    )  # fmt: skip


async def _chunks(
    events: AsyncIterator[StreamEvent], shape: _Shape, *, include_usage: bool
) -> AsyncIterator[bytes]:
    extra = {"usage": None} if include_usage else {}
    try:
        async for chunk in _shaped(events, shape, extra, include_usage):
            yield chunk
    except GuardTimeout as exc:
        message = f"{exc}: a strict request fails closed"
        yield _data({"error": {"message": message, "type": "server_error", "param": None,
                               "code": "guard_unavailable"}})  # fmt: skip
    yield b"data: [DONE]\r\n\r\n"


async def _shaped(
    events: AsyncIterator[StreamEvent], shape: _Shape, extra: dict[str, Any], include_usage: bool
) -> AsyncIterator[bytes]:
    first = True
    async for event in events:
        if isinstance(event, StartedEvent):
            shape.model = event.model
            chunk = shape.envelope(chunk=True) | extra
            yield _data(chunk | {"choices": [shape.choice("", None, chunk=True, first=True)]})
            first = False
        elif isinstance(event, TokenEvent) and event.text:
            choice = shape.choice(event.text, None, chunk=True, first=first)
            yield _data(shape.envelope(chunk=True) | extra | {"choices": [choice]})
            first = False
        elif isinstance(event, FinishedEvent):
            reason = _FINISH_REASONS[event.finish_reason]
            choice = shape.choice(None, reason, chunk=True, first=first)
            yield _data(shape.envelope(chunk=True) | extra | {"choices": [choice]})
            if include_usage:
                yield _data(shape.envelope(chunk=True) | {"choices": [], "usage": _usage(event)})
        elif isinstance(event, FailedEvent):
            yield _data({"error": _error_body(event)[1]})


async def _whole(
    events: AsyncIterator[StreamEvent], shape: _Shape, headers: dict[str, str]
) -> JSONResponse:
    text = []
    async for event in events:
        if isinstance(event, StartedEvent):
            shape.model = event.model
        elif isinstance(event, TokenEvent):
            text.append(event.text)
        elif isinstance(event, FinishedEvent):
            choice = shape.choice("".join(text), _FINISH_REASONS[event.finish_reason], chunk=False)
            body = shape.envelope(chunk=False) | {"choices": [choice], "usage": _usage(event)}
            return JSONResponse(body, headers=headers)
        elif isinstance(event, FailedEvent):
            status, error = _error_body(event)
            return JSONResponse({"error": error}, status_code=status, headers=headers)
    raise ApiError(500, "internal_error", "the stream ended without a terminal event")


def _error_body(failed: FailedEvent) -> tuple[int, dict[str, Any]]:
    status, kind, code = {
        ErrorCode.UNKNOWN_MODEL: (404, "invalid_request_error", "model_not_found"),
        ErrorCode.INVALID_REQUEST: (400, "invalid_request_error", "invalid_request"),
        ErrorCode.PROMPT_TOO_LONG: (400, "invalid_request_error", "context_length_exceeded"),
        ErrorCode.INTERNAL_ERROR: (500, "server_error", "internal_error"),
    }[failed.code]
    return status, {"message": failed.message, "type": kind, "param": None, "code": code}


def _data(payload: dict[str, Any]) -> bytes:
    """An OpenAI stream chunk: a data-only SSE frame (the one place it is written)."""
    return b"data: %s\r\n\r\n" % json.dumps(payload, separators=(",", ":")).encode()


def _first_error(exc: ValidationError) -> str:
    return describe(exc.errors()[:1], root="")


def _invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, "invalid_request", message, param=param)


def _now() -> datetime:
    return datetime.now(UTC)
