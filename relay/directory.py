"""What the relay knows about each request: whose it is, and its stream options.

Requests submitted through this process are remembered as they are accepted; any
other (submitted through another API instance, or before a restart) costs one
lookup in the log, then is remembered too. Bounded, least recently used first out.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass

from schemas import GenerationRequest
from tokenbus.access import Access, Caller
from tokenbus.http import ApiError

from .log import LogReader, LogReadTimeout


@dataclass(frozen=True, slots=True)
class KnownRequest:
    request_id: uuid.UUID
    tenant: str | None  # None: a malformed submission, owned by nobody in particular
    cancel_on_disconnect: bool = False

    @classmethod
    def of(cls, request: GenerationRequest) -> KnownRequest:
        return cls(request.request_id, request.tenant, request.cancel_on_disconnect)


class RequestDirectory:
    def __init__(self, log: LogReader, access: Access, *, max_entries: int = 100_000) -> None:
        self._log = log
        self._access = access
        self._max_entries = max_entries
        self._known: OrderedDict[uuid.UUID, KnownRequest] = OrderedDict()

    def remember(self, request: GenerationRequest) -> None:
        self._put(KnownRequest.of(request))

    async def lookup(self, request_id: uuid.UUID) -> KnownRequest | None:
        """The request, or None if nothing was submitted under this id."""
        known = self._known.get(request_id)
        if known is not None:
            self._known.move_to_end(request_id)
            return known
        submitted = await self._log.find_request(request_id)
        if submitted is None:
            return None
        if submitted.request is None:
            known = KnownRequest(request_id, tenant=None)
        else:
            known = KnownRequest.of(submitted.request)
        self._put(known)
        return known

    async def owned(self, request_id: uuid.UUID, caller: Caller) -> KnownRequest:
        """The request, if it exists and is the caller's; else 404. A request of another
        tenant looks exactly like a missing one, so nothing about it leaks."""
        try:
            known = await self.lookup(request_id)
        except LogReadTimeout as exc:
            raise ApiError(503, "log_unavailable", str(exc), {"Retry-After": "5"}) from exc
        if known is None or (known.tenant != caller.tenant and not self._access.anonymous):
            raise ApiError(404, "unknown_request", f"no request {request_id} was submitted (or "
                           "it has left the log's retention window)")  # fmt: skip
        return known

    def _put(self, known: KnownRequest) -> None:
        self._known[known.request_id] = known
        self._known.move_to_end(known.request_id)
        while len(self._known) > self._max_entries:
            self._known.popitem(last=False)
