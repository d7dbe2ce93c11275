"""The client commands, over HTTP (TOKENBUS_URL): `submit` a job, `stream` one by
request id, `replay` a finished one."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from tokenbus.bus.settings import ClientSettings
from tokenbus.cli.settings import given


def submit(args: argparse.Namespace) -> int:
    return asyncio.run(_submit(args))


async def _submit(args: argparse.Namespace) -> int:
    from producers import TokenbusClient, TokenbusError

    settings = ClientSettings(**given(url=args.url, api_key=args.api_key))
    async with TokenbusClient(settings.url, api_key=settings.key()) as client:
        params = given(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        try:
            if args.raw:
                submission = await client.submit(args.prompt, **params)
            else:
                messages = [{"role": "user", "content": args.prompt}]
                submission = await client.submit(messages=messages, **params)
        except TokenbusError as exc:  # 401 without a key, 422 …: a reason, no traceback
            print(f"tokenbus: {exc}", file=sys.stderr)
            return 1
        print(submission.request_id, file=sys.stderr if args.follow else sys.stdout)
        if not args.follow:
            return 0
        return await _print_stream(client, str(submission.request_id), after=-1)


def stream(args: argparse.Namespace) -> int:
    return asyncio.run(_stream(args, after=args.after))


def replay(args: argparse.Namespace) -> int:
    return asyncio.run(_stream(args, after=-1, pace=args.pace))


async def _stream(args: argparse.Namespace, *, after: int, pace: str = "fast") -> int:
    from producers import TokenbusClient, TokenbusError

    settings = ClientSettings(**given(url=args.url, api_key=args.api_key))
    async with TokenbusClient(settings.url, api_key=settings.key()) as client:
        try:
            return await _print_stream(client, args.request_id, after=after, as_json=args.json,
                                       pace=pace)  # fmt: skip
        except TokenbusError as exc:  # 404, 416 after_end_of_stream …: a reason, no traceback
            print(f"tokenbus: {exc}", file=sys.stderr)
            return 1


async def _print_stream(
    client: Any, request_id: str, *, after: int, as_json: bool = False, pace: str = "fast"
) -> int:
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
