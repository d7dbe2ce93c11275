"""What a worker publishes: the `StreamEvent` union on `tokenbus.tokens`.

A stream is ``started``, any number of ``token``, then exactly one terminal event
(``finished`` or ``failed``), with ``seq`` counting 0, 1, 2 ... without gaps. A
``failed`` event may also come first, when a request is rejected before any
generation (then it is seq 0 and the stream has no ``started``).

``attempt`` fences stale workers; see `schemas.fencing` for the rule every reader
applies.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from .requests import SCHEMA_VERSION, ModerationMode


class FinishReason(StrEnum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # deadline passed
    CONTENT_FILTER = "content_filter"  # the guard flagged the text (see schemas.verdicts)


class ErrorCode(StrEnum):
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_MODEL = "unknown_model"
    PROMPT_TOO_LONG = "prompt_too_long"
    INTERNAL_ERROR = "internal_error"


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = SCHEMA_VERSION
    request_id: uuid.UUID
    seq: int = Field(ge=0)
    ts: AwareDatetime
    worker: str
    attempt: int = Field(default=0, ge=0)  # when this worker took the request (Unix ms)


class StartedEvent(_Event):
    type: Literal["started"] = "started"
    model: str
    model_revision: str
    prompt_tokens: int
    queue_wait_ms: float
    # What the guard needs to judge the stream, so that it reads tokenbus.tokens
    # alone: whose policies apply, and the request's moderation mode (resolved at
    # submission). None in streams written before the guard existed.
    tenant: str | None = None
    moderation: ModerationMode | None = None


class TokenEvent(_Event):
    type: Literal["token"] = "token"
    # The text to append. May be empty while a multi-byte character is incomplete
    # or while text that may begin a stop string is held back; a later event
    # carries it. Concatenating every `text` gives the generated text exactly.
    text: str
    token_ids: list[int]
    logprob: float | None = None


class Usage(BaseModel):
    model_config = ConfigDict(frozen=True)

    prompt_tokens: int
    completion_tokens: int


class Timings(BaseModel):
    model_config = ConfigDict(frozen=True)

    ttft_ms: float | None  # pickup -> first token; None when no token was generated
    total_ms: float  # pickup -> terminal event


class ContentFilter(BaseModel):
    """Why a stream ended ``content_filter``: the guard's violation that stopped it."""

    model_config = ConfigDict(frozen=True)

    category: str
    policy: str
    policy_version: str
    seq: int  # the first event holding the flagged text


class FinishedEvent(_Event):
    type: Literal["finished"] = "finished"
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    content_filter: ContentFilter | None = None  # with finish_reason content_filter


class FailedEvent(_Event):
    type: Literal["failed"] = "failed"
    code: ErrorCode
    message: str


StreamEvent = Annotated[
    StartedEvent | TokenEvent | FinishedEvent | FailedEvent, Field(discriminator="type")
]


def is_terminal(event: StreamEvent) -> bool:
    return isinstance(event, FinishedEvent | FailedEvent)
