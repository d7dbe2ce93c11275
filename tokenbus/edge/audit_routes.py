"""``GET /v1/requests/{id}/audit``: what the audit store holds of one request (prompt,
parameters, model revision, workers and attempts, per-event timings) and whether its
records verify against the signed checkpoints: the console's audit view.

Served by a relay given the audit store (``tokenbus up`` does; ``tokenbus serve`` with
``TOKENBUS_AUDIT_VIEW=true`` reads ``TOKENBUS_AUDIT_STORE`` and the key settings of
`AuditSettings`). Its tenant alone may read a request's audit, as its stream: another
tenant gets the same 404 as for an id never submitted.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request

from consumers.audit import AuditKeyError, StoreError, audited, open_store, verifying_key
from tokenbus.bus.settings import AuditSettings

from .access import Access
from .directory import RequestDirectory
from .errors import ApiError, client_address, parse_request_id

router = APIRouter()


class AuditView:
    """Reads the audit store, per request, in a thread (the stores are blocking)."""

    def __init__(self, settings: AuditSettings) -> None:
        self._settings = settings

    async def read(self, request_id: uuid.UUID) -> dict[str, Any] | None:
        return await asyncio.to_thread(self._read, request_id)

    def _read(self, request_id: uuid.UUID) -> dict[str, Any] | None:
        store = open_store(self._settings.store, create=False)
        try:
            store.open()
        except StoreError as exc:
            if self._settings.store.startswith(("postgresql://", "postgres://")):
                raise ApiError(
                    503, "audit_store_unavailable", str(exc), {"Retry-After": "5"}
                ) from exc
            return None  # no SQLite file yet: the audit consumer has not started
        try:
            try:
                # Read each time: under `tokenbus up` the consumer makes its key after
                # the relay starts, and a key set later is taken without a restart.
                key, _ = verifying_key(self._settings)
            except AuditKeyError as exc:
                found = audited(store, None, request_id)
                if found is not None:
                    found["verification"]["reason"] = str(exc)
                return found
            return audited(store, key, request_id)
        finally:
            store.close()


@router.get("/v1/requests/{request_id}/audit")
async def audit_of(
    request_id: str,
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    rid = parse_request_id(request_id)
    access: Access = request.state.access
    caller = access.authenticate(authorization, client_address(request))
    view: AuditView | None = request.state.audit_view
    if view is None:
        raise ApiError(
            404, "audit_view_off",
            "this relay serves no audit view: start it with TOKENBUS_AUDIT_VIEW=true and the "
            "audit store's TOKENBUS_AUDIT_STORE (tokenbus up does), or run `tokenbus audit show`",
        )  # fmt: skip
    directory: RequestDirectory = request.state.directory
    await directory.owned(rid, caller)  # another tenant's: the same 404 as an unknown id
    found = await view.read(rid)
    if found is None:
        raise ApiError(
            404, "not_audited_yet",
            f"the audit store holds nothing of {rid} yet: the audit consumer is behind or "
            "not running (see its lag metric)",
        )  # fmt: skip
    return found
