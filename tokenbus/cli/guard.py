"""`tokenbus guard`: the moderation consumer (consumers/guard). A policy file that
cannot be used is one line saying what to fix, exit status 2."""

from __future__ import annotations

import argparse
import asyncio
import logging

from tokenbus.cli.heap import freeze_startup_heap
from tokenbus.cli.interrupts import until_interrupted
from tokenbus.cli.settings import SetupError, check_kafka, given, kafka_settings

log = logging.getLogger("tokenbus")


def guard(args: argparse.Namespace) -> int:
    from consumers.guard import Guard, Policies, PolicyError
    from tokenbus.bus.settings import GuardSettings

    settings = GuardSettings(**given(policies=args.policies, metrics_port=args.metrics_port))
    try:
        policies = Policies.load(settings.policies)
    except PolicyError as exc:
        raise SetupError(f"TOKENBUS_GUARD_POLICIES: {exc}") from None
    similarity = None
    if policies.any_topics:
        from consumers.guard.semantic import SemanticUnavailable, TopicModel

        try:
            similarity = TopicModel().similarity
        except SemanticUnavailable as exc:
            raise SetupError(str(exc)) from None
    kafka = kafka_settings()
    check_kafka(kafka)
    service = Guard(kafka=kafka, settings=settings, policies=policies, similarity=similarity)
    if settings.metrics_port is not None:
        service.metrics.serve(settings.metrics_port, settings.metrics_host)
    if settings.policies is None:
        log.info("no policy file (TOKENBUS_GUARD_POLICIES): PII and secrets for every tenant")
    freeze_startup_heap()
    asyncio.run(until_interrupted(service.run()))
    return 0
