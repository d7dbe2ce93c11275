"""Job submission: the HTTP API, the Python client, the Kafka producer behind them."""

from .client import Submission, TokenbusClient, TokenbusError
from .submitter import BrokerUnavailable, Submitter

__all__ = ["BrokerUnavailable", "Submission", "Submitter", "TokenbusClient", "TokenbusError"]
