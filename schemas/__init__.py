"""The contract: every message on the bus, its topic, and its one encoding."""

from .events import (
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
    PromptInput,
    SamplingParams,
)
from .topics import Topics, message_key
from .wire import (
    MalformedMessage,
    decode_cancel,
    decode_event,
    decode_request,
    encode,
    sse_error_frame,
    sse_frame,
)

__all__ = [
    "DEFAULT_MODEL",
    "SCHEMA_VERSION",
    "Cancel",
    "ChatMessage",
    "ErrorCode",
    "FailedEvent",
    "FinishReason",
    "FinishedEvent",
    "GenerationRequest",
    "MalformedMessage",
    "PromptInput",
    "SamplingParams",
    "StartedEvent",
    "StreamEvent",
    "StreamView",
    "Timings",
    "TokenEvent",
    "Topics",
    "Usage",
    "decode_cancel",
    "decode_event",
    "decode_request",
    "encode",
    "is_terminal",
    "message_key",
    "sse_error_frame",
    "sse_frame",
    "uuid7",
    "uuid7_unix_ms",
]
