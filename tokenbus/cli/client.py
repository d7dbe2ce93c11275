"""The client commands, over HTTP (TOKENBUS_URL): `submit` a job, `stream` one by
request id, `replay` a finished one, `cancel` one. What the server refuses, and a
server that is not there, are one line each (`tokenbus.cli.errors`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from tokenbus.bus.settings import ClientSettings
from tokenbus.cli.settings import SetupError, given, request_id, settings_of

if TYPE_CHECKING:
    from producers import AsyncTokenbus  # imported where used, with httpx
    from producers.protocol import Pace


def _client(args: argparse.Namespace) -> AsyncTokenbus:
    from producers import AsyncTokenbus

    settings = settings_of(ClientSettings, **given(url=args.url, api_key=args.api_key))
    return AsyncTokenbus(settings.url, api_key=settings.key())


def submit(args: argparse.Namespace) -> int:
    return asyncio.run(_submit(args))


async def _submit(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        options = {
            "model": args.model, "max_tokens": args.max_tokens,
            "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "seed": args.seed, "stop": args.stop, "deadline": args.deadline,
            "metadata": _metadata(args.meta),
        }  # fmt: skip
        if args.raw:
            if args.system is not None:
                raise SetupError("--system makes a chat: leave out --raw")
            submission = await client.submit(args.prompt, **options)
        else:
            messages = [{"role": "user", "content": args.prompt}]
            if args.system is not None:
                messages.insert(0, {"role": "system", "content": args.system})
            submission = await client.submit(messages=messages, **options)
        print(submission.request_id, file=sys.stderr if args.follow else sys.stdout)
        if not args.follow:
            return 0
        return await _print_stream(client, str(submission.request_id), after=-1)


def _metadata(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    metadata = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SetupError(f"--meta {pair!r}: give KEY=VALUE")
        metadata[key] = value
    return metadata


def stream(args: argparse.Namespace) -> int:
    return asyncio.run(_stream(args, after=args.after))


def replay(args: argparse.Namespace) -> int:
    return asyncio.run(_stream(args, after=-1, pace=args.pace))


async def _stream(args: argparse.Namespace, *, after: int, pace: Pace = "fast") -> int:
    rid = str(request_id(args.request_id))
    async with _client(args) as client:
        return await _print_stream(client, rid, after=after, as_json=args.json, pace=pace)


def cancel(args: argparse.Namespace) -> int:
    rid = request_id(args.request_id)

    async def run() -> None:
        async with _client(args) as client:
            await client.cancel(rid)

    asyncio.run(run())
    print(f"cancelling {rid}")
    return 0


async def _print_stream(
    client: AsyncTokenbus, request_id: str, *, after: int, as_json: bool = False,
    pace: Pace = "fast",
) -> int:  # fmt: skip
    """Print the text as it arrives (or every event as a JSON line); 1 if it failed."""
    from schemas import FailedEvent, FinishedEvent, TokenEvent

    status = 0
    async for event in client.stream(request_id, after=after, pace=pace):
        if as_json:
            print(event.model_dump_json(), flush=True)
        elif isinstance(event, TokenEvent):
            print(event.text, end="", flush=True)
        elif isinstance(event, FinishedEvent):
            print(
                f"\n[{event.finish_reason}: {event.usage.completion_tokens} tokens, "
                f"ttft {event.timings.ttft_ms or 0:.0f} ms]",
                file=sys.stderr,
            )
        elif isinstance(event, FailedEvent):
            print(f"\n[failed: {event.code}: {event.message}]", file=sys.stderr)
            status = 1
    return status
