"""`tokenbus audit`: the audit consumer (`run`) and the tools that read its store
(`verify`, `show`, `export`, `keygen`). A store or key problem is a message saying
what to fix, exit status 2."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from tokenbus.bus.settings import AuditSettings, KafkaSettings
from tokenbus.cli.interrupts import until_interrupted
from tokenbus.cli.settings import check_kafka, given, kafka_settings


def _audit_settings(args: argparse.Namespace) -> AuditSettings:
    return AuditSettings(
        **given(
            store=args.store,
            public_key=getattr(args, "public_key", None),
            from_beginning=getattr(args, "from_beginning", None) or None,
        )
    )


def _audit_command(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A store or key problem is a message saying what to fix, not a traceback."""

    def guarded(args: argparse.Namespace) -> int:
        from consumers.audit import AuditKeyError, StoreError

        try:
            return run(args)
        except (AuditKeyError, StoreError) as exc:
            print(f"tokenbus audit: {exc}", file=sys.stderr)
            return 2

    return guarded


@_audit_command
def run(args: argparse.Namespace) -> int:
    from consumers.audit import AuditConsumer, open_store, signing_key
    from consumers.audit.metrics import serve_metrics

    settings = _audit_settings(args)
    kafka = kafka_settings()
    check_kafka(kafka)
    consumer = AuditConsumer(
        kafka=kafka,
        settings=settings,
        store=open_store(settings.store),
        key=signing_key(settings),
    )
    if settings.metrics_port is not None:
        serve_metrics(
            consumer.stats, settings.metrics_port, settings.metrics_host, lag=consumer.lag
        )
    asyncio.run(until_interrupted(consumer.run()))
    return 0


@_audit_command
def verify(args: argparse.Namespace) -> int:
    from aiokafka.errors import KafkaError

    from consumers.audit import open_store, verifying_key
    from consumers.audit import verify as verify_store
    from consumers.audit.witness import compare, default_store_id, published

    settings = _audit_settings(args)
    with open_store(settings.store, create=False) as store:
        key, source = verifying_key(settings)
        # Checkpoints come every TOKENBUS_AUDIT_CHECKPOINT_EVERY_S: records older than
        # a few intervals that none covers had theirs deleted.
        stale = datetime.now(UTC) - timedelta(seconds=3 * settings.checkpoint_every_s + 60)
        report = verify_store(store, key, stale_before=stale)
        held = store.checkpoints()
    # The store alone cannot show that its history was rewritten and every checkpoint
    # deleted: the witness topic and a checkpoint noted elsewhere can.
    witnessed = []
    if args.witness:
        store_id = settings.store_id or default_store_id(key.public_bytes_raw())
        try:
            # The whole of asyncio.run: nothing cancels it from outside (Ctrl-C aside).
            witnessed = asyncio.run(asyncio.wait_for(published(KafkaSettings(), store_id), 60))  # noqa: TID251
        except (KafkaError, TimeoutError) as exc:
            print(f"tokenbus audit: cannot read the witness topic: {exc}", file=sys.stderr)
            return 2
    report.findings += compare(held, witnessed, key, args.expect_checkpoint)
    for finding in report.findings:
        print(f"TAMPERED {finding}")
    witness = f"; {len(witnessed)} checkpoints published to the witness" if args.witness else ""
    print(
        f"{'FAILED' if report.findings else 'OK'}: {report.requests} requests, "
        f"{report.records} records, {report.checkpoints} checkpoints checked with the public key "
        f"{source}; {report.uncovered} records after the last checkpoint{witness}",
        file=sys.stderr,
    )
    return 1 if report.findings else 0


def checkpoint_ref(text: str) -> tuple[int, bytes]:
    """``N:HASH``: a checkpoint's number and its hash (hex), as the consumer logs them."""
    number, _, digest = text.partition(":")
    try:
        return int(number), bytes.fromhex(digest)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N:HASH (a number, a hex hash)") from None


@_audit_command
def show(args: argparse.Namespace) -> int:
    from consumers.audit import open_store
    from consumers.audit import show as show_request

    with open_store(_audit_settings(args).store, create=False) as store:
        shown = show_request(store, args.request_id)
    if shown is None:
        print(f"the audit store holds nothing of request {args.request_id}", file=sys.stderr)
        return 1
    print(shown)
    return 0


@_audit_command
def export(args: argparse.Namespace) -> int:
    from consumers.audit import export_jsonl, open_store

    with open_store(_audit_settings(args).store, create=False) as store:
        try:
            for line in export_jsonl(store, since=args.since, until=args.until):
                print(line)
        except BrokenPipeError:  # `| head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def keygen(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    print(f"TOKENBUS_AUDIT_SIGNING_KEY={key.private_bytes_raw().hex()}")
    print(f"TOKENBUS_AUDIT_PUBLIC_KEY={key.public_key().public_bytes_raw().hex()}")
    return 0


def when(text: str) -> datetime:
    """A --since/--until value: an ISO date or datetime; UTC unless it says otherwise."""
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)
