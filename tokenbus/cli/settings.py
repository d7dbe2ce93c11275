"""Settings from flags and the environment, and `SetupError`: a setting that cannot
work is one line saying which, not a traceback."""

from __future__ import annotations

import asyncio
from typing import Any

from tokenbus.bus.settings import KafkaSettings


class SetupError(Exception):
    """A setting that cannot work: printed as one line, exit status 2."""


def given(**flags: Any) -> dict[str, Any]:
    """Flags the user gave; the rest fall back to the environment and defaults."""
    return {name: value for name, value in flags.items() if value is not None}


def kafka_settings(**flags: Any) -> KafkaSettings:
    """The Kafka settings from flags and the environment; a bad one is a `SetupError`
    naming the variable, not a traceback."""
    from pydantic import ValidationError

    try:
        return KafkaSettings(**flags)
    except ValidationError as exc:
        raise SetupError("; ".join(_setting_error(error) for error in exc.errors())) from None


def _setting_error(error: Any) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:
        return message  # the model's own check: its message names the variables
    return f"TOKENBUS_{str(error['loc'][0]).upper()}: {message}"


def check_kafka(kafka: KafkaSettings) -> None:
    """Fail at start, in one line, if the broker refuses these settings (a wrong
    password, an untrusted certificate) rather than retry them forever."""
    from tokenbus.bus.kafka import KafkaSetupError, check_connection

    try:
        asyncio.run(check_connection(kafka))
    except KafkaSetupError as exc:
        raise SetupError(str(exc)) from None
