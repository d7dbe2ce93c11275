"""The ``tokenbus`` command line. Every flag also reads ``TOKENBUS_<FLAG>``.

One module per concern: `stack` (``up``, the supervisor of the rest), `broker`
(the embedded broker, the topics), `serve`, `worker`, `analytics`, `audit`, `guard`,
`client` (submit, stream, replay, cancel) and `parser`; `settings` (flags, the
environment, `SetupError`), `errors` (what a user got wrong, in one line) and
`interrupts` (Ctrl-C, SIGTERM) are what they share.
A command imports what it runs (torch, Faust, the audit store, the HTTP app) when
it runs, never at module level: ``tokenbus --help`` and the client commands stay
fast.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from tokenbus.cli.errors import user_error
from tokenbus.cli.interrupts import handle_interrupts
from tokenbus.cli.parser import build_parser

__all__ = ["main"]

# The commands that run a service (and log) rather than a client or a tool.
_SERVICES = {"up", "broker", "serve", "worker", "audit", "guard"}


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
    except Exception as exc:
        # A user's mistake (no server there, a wrong key, a port in use) is one line
        # saying what to do; --debug, or anything else, keeps the traceback.
        debug = args.debug or os.environ.get("TOKENBUS_DEBUG", "").lower() in ("1", "true")
        error = None if debug else user_error(exc, args.command)
        if error is None:
            raise
        print(error.message, file=sys.stderr)
        return error.status
