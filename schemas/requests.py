"""What a client asks for: `GenerationRequest` on `tokenbus.requests`, `Cancel` on
`tokenbus.control`.

Every field has a hard bound, so a worker never sees a request it cannot size up
front. The bounds live here, once; the HTTP API and the workers both enforce them
by validating against these models.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from .ids import is_uuid7

SCHEMA_VERSION = 1

MAX_PROMPT_CHARS = 32_000
MAX_MESSAGES = 64
MAX_TOKENS_LIMIT = 4096
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
MAX_METADATA_ITEMS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512

DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # what the default worker serves
ANY_MODEL = "default"  # a request that names no model: whatever the worker group serves


class ModerationMode(StrEnum):
    """What the guard (consumers/guard) does with a request's stream.

    ``off``: nothing. ``monitor``: events are delivered at once; a violation stops
    the generation and the stream ends ``content_filter``. ``strict``: as monitor,
    and the relay delivers an event only once the guard has judged it.
    """

    OFF = "off"
    MONITOR = "monitor"
    STRICT = "strict"


TenantId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
ModelName = Annotated[str, Field(min_length=1, max_length=128)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class SamplingParams(BaseModel):
    """Sampling parameters, named and bounded as in the OpenAI API.

    ``temperature == 0`` means greedy decoding; ``top_k = None`` disables top-k.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(default=256, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1, le=1000)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)


def _check_metadata(metadata: dict[str, str]) -> None:
    if len(metadata) > MAX_METADATA_ITEMS:
        raise ValueError(f"metadata has {len(metadata)} items; at most {MAX_METADATA_ITEMS}")
    for key, value in metadata.items():
        if not 0 < len(key) <= MAX_METADATA_KEY_CHARS:
            raise ValueError(f"metadata keys must be 1..{MAX_METADATA_KEY_CHARS} characters")
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise ValueError(
                f"metadata[{key!r}] is {len(value)} characters; at most {MAX_METADATA_VALUE_CHARS}"
            )


class PromptInput(BaseModel):
    """A chat (``messages``) or a plain ``prompt``: exactly one of them."""

    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)] | None = None

    @model_validator(mode="after")
    def _exactly_one_input(self) -> PromptInput:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' (a chat) or 'prompt' (plain text)")
        if self.messages is not None:
            total = sum(len(m.content) for m in self.messages)
            if total > MAX_PROMPT_CHARS:
                raise ValueError(
                    f"messages hold {total} characters in all; at most {MAX_PROMPT_CHARS}"
                )
        return self


class GenerationRequest(PromptInput):
    """A generation job, as it travels on ``tokenbus.requests``."""

    # Readers of the log ignore fields they do not know, so that a newer writer
    # never wedges an older reader; schema_version says what to expect.
    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = SCHEMA_VERSION
    request_id: uuid.UUID
    tenant: TenantId = "default"
    model: ModelName = ANY_MODEL
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    submitted_at: AwareDatetime
    deadline: AwareDatetime | None = None
    # Interactive use: a subscriber that goes away before the end cancels the request.
    # Off by default, because an async job must survive its client going away.
    cancel_on_disconnect: bool = False
    metadata: dict[str, str] = Field(default_factory=dict)
    # Set at submission: the client's choice or its tenant's default. None (a request
    # from before the guard, or a producer that does not resolve it) is `off`.
    moderation: ModerationMode | None = None

    @model_validator(mode="after")
    def _check(self) -> GenerationRequest:
        if not is_uuid7(self.request_id):
            raise ValueError("request_id must be a UUIDv7")
        _check_metadata(self.metadata)
        return self

    def expired(self, now: datetime) -> bool:
        return self.deadline is not None and now >= self.deadline


class Cancel(BaseModel):
    """Stop generating ``request_id``; on ``tokenbus.control``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = SCHEMA_VERSION
    request_id: uuid.UUID
    reason: Annotated[str, Field(max_length=256)] = "cancelled by client"
    ts: AwareDatetime


def check_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Validator for HTTP bodies that carry metadata (same bounds as the bus)."""
    _check_metadata(metadata)
    return metadata
