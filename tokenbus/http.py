"""HTTP errors in one shape, with a message that says what to do:

    {"error": {"code": "...", "message": "...", "type": "...", "param": null}}

``type`` and ``param`` are there so that OpenAI clients read the same errors.
"""

from __future__ import annotations

import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

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
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"] if p != "body") or "body"
            problems.append(f"{where}: {error['msg']}")
        return error_response(422, "invalid_request", "; ".join(problems))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return error_response(
            exc.status_code, "http_error", str(exc.detail), dict(exc.headers or {})
        )

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(HTTPException, http_error)
