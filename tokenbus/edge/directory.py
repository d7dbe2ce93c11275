"""What the relay knows about each request: whose it is, and its stream options.

Requests submitted through this process are remembered as they are accepted; any
other (submitted through another API instance, or before a restart) costs one
lookup in the log, then is remembered too. Bounded, least recently used first out.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from schemas import GenerationRequest, ModerationMode
from tokenbus.bus.log import LogReader, LogReadTimeout, Submitted

from .access import Access, Caller
from .errors import ApiError


@dataclass(frozen=True, slots=True)
class KnownRequest:
    request_id: uuid.UUID
    tenant: str | None  # None: a malformed submission, owned by nobody in particular
    cancel_on_disconnect: bool = False
    strict: bool = False  # strict moderation: deliver only what the guard has judged

    @classmethod
    def of(cls, request: GenerationRequest) -> KnownRequest:
        strict = request.moderation == ModerationMode.STRICT
        return cls(request.request_id, request.tenant, request.cancel_on_disconnect, strict)


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
        known, _ = await self._lookup(request_id)
        return known

    async def _lookup(
        self, request_id: uuid.UUID, *, stop: Callable[[Submitted], bool] = lambda _: True
    ) -> tuple[KnownRequest | None, bool]:
        """The request (or None), and whether the log was read for it."""
        known = self._known.get(request_id)
        if known is not None:
            self._known.move_to_end(request_id)
            return known, False
        submitted = await self._log.find_request(request_id, stop=stop)
        if submitted is None:
            return None, True
        if submitted.request is None:
            known = KnownRequest(request_id, tenant=None)
        else:
            known = KnownRequest.of(submitted.request)
        self._put(known)
        return known, True

    async def owned(self, request_id: uuid.UUID, caller: Caller) -> KnownRequest:
        """The request, if it exists and is the caller's; else 404. A request of another
        tenant looks exactly like a missing one, so nothing about it leaks: not the
        answer, and not the time it takes. Every 404 has read the log to its end, as
        the search for an id never submitted does; a request remembered here (a
        cache hit, milliseconds) would otherwise tell that the id exists."""
        anonymous = self._access.anonymous

        def mine(submitted: Submitted) -> bool:  # the owner's read may end once found
            request = submitted.request
            return anonymous or (request is not None and request.tenant == caller.tenant)

        try:
            known, read = await self._lookup(request_id, stop=mine)
            if known is not None and known.tenant != caller.tenant and not anonymous:
                if not read:  # remembered: read the log anyway, to its end
                    await self._log.find_request(request_id, stop=lambda _: False)
                known = None
        except LogReadTimeout as exc:
            raise ApiError(503, "log_unavailable", str(exc), {"Retry-After": "5"}) from exc
        if known is None:
            raise ApiError(404, "unknown_request", f"no request {request_id} was submitted (or "
                           "it has left the log's retention window)")  # fmt: skip
        return known

    def _put(self, known: KnownRequest) -> None:
        self._known[known.request_id] = known
        self._known.move_to_end(known.request_id)
        while len(self._known) > self._max_entries:
            self._known.popitem(last=False)
