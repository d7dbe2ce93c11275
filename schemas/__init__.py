"""The contract: every message on the bus, its topic, and its one encoding."""

from .events import (
    ContentFilter,
    ErrorCode,
    FailedEvent,
    FinishedEvent,
    FinishReason,
    StartedEvent,
    StreamEvent,
    Timings,
    TokenEvent,
    Usage,
    is_terminal,
)
from .fencing import StreamView
from .ids import uuid7, uuid7_unix_ms
from .requests import (
    DEFAULT_MODEL,
    SCHEMA_VERSION,
    Cancel,
    ChatMessage,
    GenerationRequest,
    ModerationMode,
    PromptInput,
    SamplingParams,
)
from .topics import Topics, message_key
from .verdicts import Verdict, VerdictView, Violation
from .wire import (
    MalformedMessage,
    decode_cancel,
    decode_event,
    decode_request,
    decode_verdict,
    encode,
    sse_error_frame,
    sse_frame,
)

__all__ = [
    "DEFAULT_MODEL",
    "SCHEMA_VERSION",
    "Cancel",
    "ChatMessage",
    "ContentFilter",
    "ErrorCode",
    "FailedEvent",
    "FinishReason",
    "FinishedEvent",
    "GenerationRequest",
    "MalformedMessage",
    "ModerationMode",
    "PromptInput",
    "SamplingParams",
    "StartedEvent",
    "StreamEvent",
    "StreamView",
    "Timings",
    "TokenEvent",
    "Topics",
    "Usage",
    "Verdict",
    "VerdictView",
    "Violation",
    "decode_cancel",
    "decode_event",
    "decode_request",
    "decode_verdict",
    "encode",
    "is_terminal",
    "message_key",
    "sse_error_frame",
    "sse_frame",
    "uuid7",
    "uuid7_unix_ms",
]
