"""The client commands as a user meets them: `tokenbus cancel`, and every mistake a
user can make (no server there, a bad id, an unknown one, a wrong key, a port in
use, a model path that is not there) as one line saying what to do, no traceback
unless ``--debug``."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas import FinishedEvent, FinishReason, uuid7
from tokenbus.bus.log import LogReader
from tokenbus.bus.ports import free_port
from tokenbus.bus.settings import KafkaSettings

from .conftest import Stack, assert_complete, collect, serving

LONG = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


async def tokenbus(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``tokenbus ARGS`` without this session's TOKENBUS_ and KAFKA_ settings (but
    with ``env``): its exit status, stdout and stderr."""
    mine = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENBUS_", "KAFKA_"))}
    env = mine | (env or {})
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenbus", *args, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def one_line(err: str) -> str:
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    return err.strip()


@pytest.fixture
def held_port() -> Iterator[int]:
    """A loopback port something already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


async def test_cancel_stops_a_request_and_says_so_in_one_line(stack: Stack) -> None:
    submission = await stack.client.submit(messages=LONG, max_tokens=400, temperature=0)
    rid = str(submission.request_id)
    events = []
    async for event in stack.client.stream(rid):
        events.append(event)
        if event.seq == 3:
            status, out, err = await tokenbus("cancel", rid, "--url", stack.url)
            assert status == 0, err
            assert out == f"cancelling {rid}\n"
    assert_complete(events)
    assert isinstance(events[-1], FinishedEvent)
    assert events[-1].finish_reason == FinishReason.CANCELLED


async def test_cancel_of_an_unknown_request_is_one_line(kafka: KafkaSettings) -> None:
    async with serving(kafka) as (url, _):
        status, out, err = await tokenbus("cancel", str(uuid7()), "--url", url)
    assert status == 1 and out == ""
    assert one_line(err).startswith("tokenbus: 404 unknown_request: no request")


@pytest.mark.parametrize("command", ["cancel", "stream", "replay"])
async def test_a_bad_request_id_is_refused_before_any_http_call(command: str) -> None:
    # No server on this port: an id that was sent would be "cannot reach".
    url = f"http://127.0.0.1:{free_port()}"
    status, _, err = await tokenbus(command, "not-an-id", "--url", url)
    assert status == 2
    assert one_line(err) == (
        f"tokenbus {command}: 'not-an-id' is not a request id: "
        "give the UUID that `tokenbus submit` printed"
    )


@pytest.mark.parametrize(
    "args", [["submit", "Hi"], ["stream", str(uuid7())], ["cancel", str(uuid7())]],
    ids=["submit", "stream", "cancel"],
)  # fmt: skip
async def test_an_unreachable_server_is_one_line_and_debug_shows_the_traceback(
    args: list[str],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    status, _, err = await tokenbus(*args, "--url", url)
    assert status == 1
    assert one_line(err) == (
        f"tokenbus: cannot reach {url} (is `tokenbus up` or `tokenbus serve` running? "
        "set --url / TOKENBUS_URL)"
    )
    status, _, err = await tokenbus("--debug", *args, "--url", url)
    assert status == 1
    assert "Traceback" in err and "httpx.ConnectError" in err
    status, _, err = await tokenbus(*args, "--url", url, env={"TOKENBUS_DEBUG": "1"})
    assert status == 1 and "Traceback" in err


@pytest.mark.parametrize("command", ["serve", "up"])
async def test_a_port_in_use_is_one_line(command: str, held_port: int) -> None:
    status, _, err = await tokenbus(command, "--port", str(held_port))
    assert status == 2
    assert one_line(err) == (
        f"tokenbus {command}: port {held_port} on 127.0.0.1 is in use (another tokenbus?): "
        "stop what listens there, or choose another port with --port / TOKENBUS_PORT"
    )


async def test_the_broker_port_in_use_is_one_line(held_port: int) -> None:
    status, _, err = await tokenbus("up", "--port", str(free_port()),
                                    "--broker-port", str(held_port))  # fmt: skip
    assert status == 2
    line = one_line(err)
    assert line.startswith("tokenbus up: ") and str(held_port) in line and "--broker-port" in line


@pytest.mark.parametrize("command", ["worker", "up"])
async def test_a_model_path_that_is_not_there_is_one_line(command: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    port = ["--port", str(free_port())] if command == "up" else []
    status, _, err = await tokenbus(command, f"--model={missing}", *port)
    assert status == 2
    assert one_line(err) == (
        f"tokenbus {command}: --model / TOKENBUS_MODEL: {missing} does not exist; give a "
        "local transformers model directory, or leave it out for the default SmolLM2"
    )


async def test_submit_takes_every_parameter_a_submission_has(stack: Stack) -> None:
    status, out, err = await tokenbus(
        "submit", "Say hi.", "--url", stack.url, "--system", "Be brief.", "--max-tokens", "5",
        "--temperature", "0.5", "--top-p", "0.9", "--top-k", "40", "--seed", "7",
        "--stop", "\n\n", "--stop", "END", "--meta", "team=ml", "--meta", "run=a=b",
        "--deadline", "2099-01-01T00:00:00Z",
    )  # fmt: skip
    assert status == 0, err
    rid = uuid.UUID(out.strip())
    found = await LogReader(kafka=stack.kafka).find_request(rid)
    assert found is not None and found.request is not None
    request = found.request
    assert [(m.role, m.content) for m in request.messages or []] == [
        ("system", "Be brief."), ("user", "Say hi."),
    ]  # fmt: skip
    sampling = request.sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p) == (5, 0.5, 0.9)
    assert (sampling.top_k, sampling.seed, sampling.stop) == (40, 7, ["\n\n", "END"])
    assert request.metadata == {"team": "ml", "run": "a=b"}
    assert request.deadline is not None and request.deadline.year == 2099
    events = await collect(stack.client, rid)
    assert_complete(events)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--meta", "novalue"], "--meta 'novalue': give KEY=VALUE"),
        (["--raw", "--system", "s"], "--system makes a chat: leave out --raw"),
        (["--top-p", "2"], "top_p"),
    ],
)
async def test_bad_submit_flags_are_one_line(stack: Stack, args: list[str], says: str) -> None:
    status, _, err = await tokenbus("submit", "p", "--url", stack.url, *args)
    assert status != 0
    assert says in one_line(err)
