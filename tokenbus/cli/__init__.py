"""The ``tokenbus`` command line. Every flag also reads ``TOKENBUS_<FLAG>``.

One module per concern: `stack` (``up``, the supervisor of the rest), `broker`
(the embedded broker, the topics), `serve`, `worker`, `analytics`, `audit`,
`client` (submit, stream, replay) and `parser`; `settings` (flags, the
environment, `SetupError`) and `interrupts` (Ctrl-C, SIGTERM) are what they share.
A command imports what it runs (torch, Faust, the audit store, the HTTP app) when
it runs, never at module level: ``tokenbus --help`` and the client commands stay
fast.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from tokenbus.cli.interrupts import handle_interrupts
from tokenbus.cli.parser import build_parser
from tokenbus.cli.settings import SetupError

__all__ = ["main"]

# The commands that run a service (and log) rather than a client or a tool.
_SERVICES = {"up", "broker", "serve", "worker", "audit"}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in _SERVICES:
        logging.basicConfig(
            level=os.environ.get("TOKENBUS_LOG_LEVEL", "INFO"),
            format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        )
        handle_interrupts()
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("aiokafka").setLevel(logging.WARNING)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except SetupError as exc:
        print(f"tokenbus {args.command}: {exc}", file=sys.stderr)
        return 2
