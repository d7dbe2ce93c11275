"""`tokenbus broker` (the embedded broker alone) and `tokenbus topics` (the topics on
KAFKA_BOOTSTRAP_SERVERS)."""

from __future__ import annotations

import argparse
import asyncio

from tokenbus.cli.settings import check_kafka, given, kafka_settings


def broker(args: argparse.Namespace) -> int:
    from tokenbus.bus.broker import EmbeddedBroker
    from tokenbus.bus.kafka import ensure_topics

    kafka = kafka_settings(**given(broker_port=args.broker_port))
    with EmbeddedBroker(port=kafka.broker_port, quiet=False) as embedded:
        asyncio.run(ensure_topics(kafka))
        print(f"broker on {embedded.bootstrap}; KAFKA_BOOTSTRAP_SERVERS={embedded.bootstrap}")
        embedded.wait()
    return 0


def topics(args: argparse.Namespace) -> int:
    from tokenbus.bus.kafka import ensure_topics

    kafka = kafka_settings()
    check_kafka(kafka)
    asyncio.run(ensure_topics(kafka))
    print(f"topics ready on {kafka.bootstrap}: {', '.join(kafka.topics.all())}")
    return 0
