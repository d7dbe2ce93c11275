"""Settings from flags and the environment, and `SetupError`: a setting or an
argument that cannot work is one line saying which, not a traceback."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any, TypeVar

from pydantic_settings import BaseSettings

from tokenbus.bus.settings import KafkaSettings

_S = TypeVar("_S", bound=BaseSettings)


class SetupError(Exception):
    """A setting or an argument that cannot work: printed as one line, exit status 2."""


def given(**flags: Any) -> dict[str, Any]:
    """Flags the user gave; the rest fall back to the environment and defaults."""
    return {name: value for name, value in flags.items() if value is not None}


def kafka_settings(**flags: Any) -> KafkaSettings:
    """The Kafka settings from flags and the environment; a bad one is a `SetupError`
    naming the variable, not a traceback."""
    return settings_of(KafkaSettings, **flags)


def settings_of(kind: type[_S], **flags: Any) -> _S:
    """Settings of ``kind`` from flags and the environment; a bad one is a
    `SetupError` naming the variable, not a traceback."""
    from pydantic import ValidationError

    try:
        return kind(**flags)
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


def request_id(raw: str) -> uuid.UUID:
    """A request id from the command line, checked before anything is sent."""
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise SetupError(
            f"{raw!r} is not a request id: give the UUID that `tokenbus submit` printed"
        ) from None


def check_port_free(host: str, port: int, setting: str) -> None:
    """Fail at start, in one line, if something already listens on ``port``."""
    from tokenbus.bus.ports import port_open

    if port_open(host, port):
        raise SetupError(
            f"port {port} on {host} is in use (another tokenbus?): stop what listens "
            f"there, or choose another port with {setting}"
        )


def check_model_path(path: str | None) -> None:
    """Fail at start, in one line, if ``--model`` / TOKENBUS_MODEL names no model
    directory; before torch is imported or a broker started."""
    if path is None:
        return
    directory = Path(path)
    if not directory.exists():
        raise SetupError(
            f"--model / TOKENBUS_MODEL: {path} does not exist; give a local transformers "
            "model directory, or leave it out for the default SmolLM2"
        )
    if not (directory / "config.json").is_file():
        raise SetupError(
            f"{path} is not a transformers model directory (no config.json); give one "
            "with --model / TOKENBUS_MODEL, or leave it out for the default SmolLM2"
        )
