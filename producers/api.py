"""``POST /v1/requests``: validate, assign a UUIDv7, produce, answer 202 once the
broker has the request."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import AwareDatetime, ConfigDict, Field, field_validator

from schemas import GenerationRequest, PromptInput, SamplingParams, uuid7
from schemas.requests import ANY_MODEL, ModelName, check_metadata
from tokenbus.http import ApiError

from .submitter import BrokerUnavailable, Submitter

router = APIRouter()


class SubmitBody(PromptInput, SamplingParams):
    """The body of ``POST /v1/requests``: a prompt or chat, OpenAI-style sampling
    parameters, and optional deadline and metadata."""

    model_config = ConfigDict(extra="forbid")

    model: ModelName = ANY_MODEL
    deadline: AwareDatetime | None = None
    metadata: dict[str, str] = Field(default_factory=dict)

    _metadata_bounds = field_validator("metadata")(check_metadata)

    def to_request(self, request_id: uuid.UUID, tenant: str) -> GenerationRequest:
        sampling = SamplingParams(**self.model_dump(include=set(SamplingParams.model_fields)))
        return GenerationRequest(
            request_id=request_id,
            tenant=tenant,
            model=self.model,
            messages=self.messages,
            prompt=self.prompt,
            sampling=sampling,
            submitted_at=datetime.now(UTC),
            deadline=self.deadline,
            metadata=self.metadata,
        )


def submitter(request: Request) -> Submitter:
    return request.state.submitter  # type: ignore[no-any-return]


def events_path(request_id: uuid.UUID) -> str:
    return f"/v1/requests/{request_id}/events"


@router.post("/v1/requests", status_code=202)
async def submit_request(
    body: SubmitBody, response: Response, submitter: Annotated[Submitter, Depends(submitter)]
) -> dict[str, Any]:
    request = body.to_request(uuid7(), tenant="default")
    try:
        await submitter.submit(request)
    except BrokerUnavailable as exc:
        raise ApiError(503, "broker_unavailable", str(exc), {"Retry-After": "5"}) from exc
    response.headers["Location"] = events_path(request.request_id)
    return {
        "request_id": str(request.request_id),
        "events_url": events_path(request.request_id),
        "status": "queued",
        "model": request.model,
        "submitted_at": request.submitted_at.isoformat(),
    }
