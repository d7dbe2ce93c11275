"""Job submission: the HTTP API, the Python clients, the Kafka producer behind them."""

from .client import AsyncTokenbus, TokenbusClient
from .protocol import StreamTruncated, Submission, TokenbusError
from .submitter import BrokerUnavailable, Submitter
from .sync_client import Tokenbus

__all__ = [
    "AsyncTokenbus",
    "BrokerUnavailable",
    "StreamTruncated",
    "Submission",
    "Submitter",
    "Tokenbus",
    "TokenbusClient",
    "TokenbusError",
]
