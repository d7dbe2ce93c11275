"""`tokenbus analytics`: the analytics consumer (Faust, imported when it runs)."""

from __future__ import annotations

import argparse
import os

from tokenbus.cli.settings import check_kafka, given, kafka_settings, settings_of


def analytics(args: argparse.Namespace) -> int:
    from consumers.analytics import Analytics
    from tokenbus.bus.settings import AnalyticsSettings

    settings = settings_of(
        AnalyticsSettings, **given(analytics_port=args.port, analytics_host=args.host)
    )
    kafka = kafka_settings()
    check_kafka(kafka)
    consumer = Analytics(kafka=kafka, settings=settings)
    consumer.run(loglevel=os.environ.get("TOKENBUS_LOG_LEVEL", "INFO"))
    return 0
