"""``POST /v1/requests`` and ``DELETE /v1/requests/{id}``.

A submission is validated, given a UUIDv7, produced, and answered 202 only once
the broker has it. A cancel is a `Cancel` on ``tokenbus.control``; every worker
reads it, and the one generating the request stops within a decode step.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from pydantic import AwareDatetime, ConfigDict, Field, field_validator

from producers.submitter import Submitter
from schemas import (
    Cancel,
    GenerationRequest,
    ModerationMode,
    PromptInput,
    SamplingParams,
    uuid7,
)
from schemas.requests import ANY_MODEL, ModelName, check_metadata

from .access import Access, Caller
from .directory import RequestDirectory
from .errors import client_address, json_body, parse_request_id
from .moderation import ModerationDefaults

router = APIRouter()


class SubmitBody(PromptInput, SamplingParams):
    """The body of ``POST /v1/requests``: a prompt or chat, OpenAI-style sampling
    parameters, and optional deadline, metadata, cancel_on_disconnect and
    moderation (off, monitor, strict; unset: the tenant's default).

    Read with strict JSON validation (`json_body`): ``"max_tokens": "10"`` is refused,
    and ``deadline`` is an ISO 8601 string with a zone, never a number."""

    model_config = ConfigDict(extra="forbid")

    model: ModelName = ANY_MODEL
    deadline: AwareDatetime | None = None
    cancel_on_disconnect: bool = False
    metadata: dict[str, str] = Field(default_factory=dict)
    moderation: ModerationMode | None = None

    _metadata_bounds = field_validator("metadata")(check_metadata)

    def to_request(self, request_id: uuid.UUID, tenant: str) -> GenerationRequest:
        return GenerationRequest(
            request_id=request_id,
            tenant=tenant,
            model=self.model,
            messages=self.messages,
            prompt=self.prompt,
            sampling=sampling_of(self),
            submitted_at=datetime.now(UTC),
            deadline=self.deadline,
            cancel_on_disconnect=self.cancel_on_disconnect,
            metadata=self.metadata,
            moderation=self.moderation,
        )


def sampling_of(body: SamplingParams) -> SamplingParams:
    return SamplingParams(**body.model_dump(include=set(SamplingParams.model_fields)))


def caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> Caller:
    access: Access = request.state.access
    return access.authenticate(authorization, client_address(request))


def events_path(request_id: uuid.UUID) -> str:
    return f"/v1/requests/{request_id}/events"


async def accept(
    request: Request, caller: Caller, generation: GenerationRequest
) -> GenerationRequest:
    """Rate-limit, resolve the moderation mode, produce (acknowledged), and remember a
    request; the one way in. Returns the request as produced."""
    state = request.state
    state.access.admit_submission(caller)
    moderation: ModerationDefaults = state.moderation
    generation = moderation.resolve(generation)
    submitter: Submitter = state.submitter
    await submitter.submit(generation)  # BrokerUnavailable: a 503 (errors.py)
    directory: RequestDirectory = state.directory
    directory.remember(generation)
    return generation


@router.post("/v1/requests", status_code=202)
async def submit_request(
    request: Request,
    response: Response,
    caller: Annotated[Caller, Depends(caller)],
    body: Annotated[SubmitBody, Depends(json_body(SubmitBody))],
) -> dict[str, Any]:
    generation = await accept(request, caller, body.to_request(uuid7(), tenant=caller.tenant))
    access: Access = request.state.access
    response.headers["Location"] = events_path(generation.request_id)
    return {
        "request_id": str(generation.request_id),
        "events_url": events_path(generation.request_id),
        "stream_token": access.stream_token(generation.request_id, caller.tenant),
        "status": "queued",
        "model": generation.model,
        "submitted_at": generation.submitted_at.isoformat(),
        "moderation": generation.moderation,
    }


@router.delete("/v1/requests/{request_id}", status_code=202)
async def cancel_request(
    request_id: str, request: Request, caller: Annotated[Caller, Depends(caller)]
) -> dict[str, Any]:
    rid = parse_request_id(request_id)
    directory: RequestDirectory = request.state.directory
    await directory.owned(rid, caller)
    submitter: Submitter = request.state.submitter
    await submitter.cancel(Cancel(request_id=rid, reason="cancelled by client",
                                  ts=datetime.now(UTC)))  # fmt: skip
    return {"request_id": str(rid), "status": "cancelling"}
