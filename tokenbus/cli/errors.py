"""What a user got wrong, as one line that says what to do: the one place that
turns a known exception into the line and the exit status `main` prints.

Anything else is a bug and keeps its traceback; ``tokenbus --debug`` keeps the
traceback of these too.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenbus.cli.settings import SetupError


@dataclass(frozen=True, slots=True)
class UserError:
    message: str
    status: int


# What to add to the server's own message, by HTTP status.
_HINTS = {
    401: "give a key with --api-key or TOKENBUS_API_KEY",
    403: "use the API key that submitted it",
}


def user_error(exc: BaseException, command: str) -> UserError | None:
    """The line to print for ``exc``, or None if it is not the user's to fix."""
    # Imported here, once something failed: `tokenbus --help` stays quick.
    import httpx

    from producers import StreamTruncated, TokenbusError
    from tokenbus.bus.broker import BrokerStartError

    if isinstance(exc, SetupError | BrokerStartError):
        return UserError(f"tokenbus {command}: {exc}", 2)
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return UserError(
            f"tokenbus: cannot reach {_server_of(exc)} (is `tokenbus up` or `tokenbus serve` "
            "running? set --url / TOKENBUS_URL)",
            1,
        )
    if isinstance(exc, httpx.TransportError):
        return UserError(f"tokenbus: lost the connection to {_server_of(exc)} "
                         f"({type(exc).__name__}: {exc}); try again", 1)  # fmt: skip
    if isinstance(exc, TokenbusError):
        hint = _HINTS.get(exc.status)
        return UserError(f"tokenbus: {exc}" + (f" ({hint})" if hint else ""), 1)
    if isinstance(exc, StreamTruncated):
        return UserError(f"tokenbus: {exc}", 1)
    return None


def _server_of(exc: BaseException) -> str:
    import httpx

    try:
        url = exc.request.url if isinstance(exc, httpx.RequestError) else None
    except RuntimeError:  # raised without its request
        url = None
    return f"{url.scheme}://{url.netloc.decode()}" if url is not None else "the server"
