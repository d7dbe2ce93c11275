"""Job submission: the HTTP API, the Python client, the Kafka producer behind them."""

from .client import StreamTruncated, Submission, TokenbusClient, TokenbusError
from .submitter import BrokerUnavailable, Submitter

__all__ = [
    "BrokerUnavailable",
    "StreamTruncated",
    "Submission",
    "Submitter",
    "TokenbusClient",
    "TokenbusError",
]
