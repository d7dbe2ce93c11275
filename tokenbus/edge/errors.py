"""HTTP errors in one shape, with a message that says what to do:

    {"error": {"code": "...", "message": "...", "type": "...", "param": null}}

``type`` and ``param`` are there so that OpenAI clients read the same errors.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from starlette.exceptions import HTTPException

from producers.submitter import BrokerUnavailable
from schemas.ids import is_uuid7


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        *,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.param = param


Body = TypeVar("Body", bound=BaseModel)


def json_body(
    model: type[Body], *, status: int = 422, first_only: bool = False
) -> Callable[[Request], Awaitable[Body]]:
    """A dependency that reads a request body as ``model``, strictly, from the JSON.

    Strict JSON validation: a JSON string is not an integer (``"10"`` is refused, not
    read as 10), a datetime is an ISO 8601 string (``123`` is not 1970), a boolean is
    ``true`` or ``false``. The JSON is parsed by pydantic-core, which refuses what
    cannot be sent on (a lone surrogate such as ``"\\udc00"``) as invalid JSON.
    """

    async def parse(request: Request) -> Body:
        raw = await request.body()
        try:
            return model.model_validate_json(raw, strict=True)
        except ValidationError as exc:
            errors = exc.errors()[:1] if first_only else exc.errors()
            raise ApiError(status, "invalid_request", describe(errors),
                           param=_param(errors[0])) from None  # fmt: skip

    return parse


def describe(errors: list[ErrorDetails], *, root: str = "body") -> str:
    """Validation errors as one line, "where: what; …"; ``root`` names an error that
    has no location (a request body is "body"; "" leaves only the message)."""
    problems = []
    for error in errors:
        where = ".".join(str(p) for p in error["loc"] if p != "body") or root
        problems.append(f"{where}: {error['msg']}" if where else str(error["msg"]))
    return "; ".join(problems)


def _param(error: ErrorDetails) -> str | None:
    names = [str(p) for p in error["loc"] if p != "body"]
    return ".".join(names) or None


def parse_request_id(raw: str) -> uuid.UUID:
    try:
        request_id = uuid.UUID(raw)
    except ValueError:
        raise ApiError(400, "invalid_request_id", f"{raw!r} is not a request id (a UUID)") from None
    if not is_uuid7(request_id):
        raise ApiError(400, "invalid_request_id", f"{raw} is not a tokenbus request id (UUIDv7)")
    return request_id


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def error_response(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    param: str | None = None,
) -> JSONResponse:
    error = {"code": code, "message": message, "type": _error_type(status), "param": param}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def _error_type(status: int) -> str:
    return {
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
    }.get(status, "server_error" if status >= 500 else "invalid_request_error")


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message, exc.headers, param=exc.param)

    async def invalid_body(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(422, "invalid_request", describe(list(exc.errors())))

    async def invalid_value(request: Request, exc: Exception) -> JSONResponse:
        # Input that got past a route's own validation and was refused by a model
        # built from it (a message the bus would not carry, say): the client's
        # input is wrong, so a 4xx in the usual shape, never a 500.
        assert isinstance(exc, ValidationError)
        return error_response(422, "invalid_request", describe(exc.errors()))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return error_response(
            exc.status_code, "http_error", str(exc.detail), dict(exc.headers or {})
        )

    async def broker_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # The broker did not acknowledge a request or a cancel in time: nothing the
        # client did wrong, and worth trying again.
        return error_response(503, "broker_unavailable", str(exc), {"Retry-After": "5"})

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(BrokerUnavailable, broker_unavailable)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(ValidationError, invalid_value)
    app.add_exception_handler(HTTPException, http_error)
