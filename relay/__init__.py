"""The SSE relay: subscribe to a request's stream by id, resume, replay, fan out."""

from .hub import StreamHub
from .subscription import subscribe

__all__ = ["StreamHub", "subscribe"]
