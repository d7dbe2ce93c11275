"""The argument parser: every command, its flags, and the function that runs it.

Building it imports each command's module, none of what a command runs."""

from __future__ import annotations

import argparse
import uuid

from tokenbus.cli import analytics, audit, broker, client, guard, serve, stack, worker


def build_parser() -> argparse.ArgumentParser:
    from tokenbus import __version__

    parser = argparse.ArgumentParser(prog="tokenbus", description="LLM token streaming over Kafka.")
    parser.add_argument("--version", action="version", version=f"tokenbus {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error, not one line [TOKENBUS_DEBUG=1]",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up_cmd = commands.add_parser("up", help="everything on the embedded default; Ctrl-C stops all")
    _server_flags(up_cmd)
    up_cmd.add_argument(
        "--broker-port", type=int, help="embedded broker port [TOKENBUS_BROKER_PORT]"
    )
    _model_flags(up_cmd)
    up_cmd.set_defaults(run=stack.up)

    broker_cmd = commands.add_parser("broker", help="the embedded broker alone")
    broker_cmd.add_argument("--broker-port", type=int, help="[TOKENBUS_BROKER_PORT]")
    broker_cmd.set_defaults(run=broker.broker)

    topics_cmd = commands.add_parser("topics", help="create the topics on KAFKA_BOOTSTRAP_SERVERS")
    topics_cmd.set_defaults(run=broker.topics)

    serve_cmd = commands.add_parser("serve", help="API + relay (HTTP)")
    _server_flags(serve_cmd)
    serve_cmd.add_argument(
        "--workers",
        type=int,
        help="relay processes on the port, for more than one core [TOKENBUS_SERVE_WORKERS, "
        "default 1]",
    )
    serve_cmd.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    serve_cmd.set_defaults(run=serve.serve)

    worker_cmd = commands.add_parser("worker", help="one model worker")
    _model_flags(worker_cmd)
    worker_cmd.add_argument("--max-batch", type=int, help="sequences at once [TOKENBUS_MAX_BATCH]")
    worker_cmd.set_defaults(run=worker.worker)

    analytics_cmd = commands.add_parser("analytics", help="the analytics consumer")
    analytics_cmd.add_argument(
        "--port", type=int, help="/metrics, /summary [TOKENBUS_ANALYTICS_PORT]"
    )
    analytics_cmd.add_argument("--host", help="HTTP address [TOKENBUS_ANALYTICS_HOST]")
    analytics_cmd.set_defaults(run=analytics.analytics)

    guard_cmd = commands.add_parser("guard", help="the moderation consumer (streaming guardrails)")
    guard_cmd.add_argument(
        "--policies", help="the policy file, TOML (docs/guard.md) [TOKENBUS_GUARD_POLICIES]"
    )
    guard_cmd.add_argument(
        "--metrics-port", type=int, help="serve /metrics here [TOKENBUS_GUARD_METRICS_PORT]"
    )
    guard_cmd.set_defaults(run=guard.guard)

    _client_commands(commands)
    _audit_commands(commands)
    return parser


def _client_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    submit = commands.add_parser("submit", help="submit a job; --follow streams it")
    submit.add_argument("prompt")
    submit.add_argument("--follow", "-f", action="store_true", help="stream the answer")
    submit.add_argument("--raw", action="store_true", help="send as a plain prompt, not a chat")
    submit.add_argument("--system", help="a system message before the prompt (a chat)")
    submit.add_argument("--model", help="a model the workers serve [the server's default]")
    submit.add_argument("--max-tokens", type=int)
    submit.add_argument("--temperature", type=float)
    submit.add_argument("--top-p", type=float)
    submit.add_argument("--top-k", type=int)
    submit.add_argument("--seed", type=int)
    submit.add_argument(
        "--stop", action="append", help="end the answer before this text (repeatable)"
    )
    submit.add_argument("--deadline", help="fail if not done by then (ISO 8601 with a zone)")
    submit.add_argument(
        "--meta",
        action="append",
        metavar="KEY=VALUE",
        help="metadata kept with the request (repeatable)",
    )
    _url_flag(submit)
    submit.set_defaults(run=client.submit)

    stream = commands.add_parser("stream", help="subscribe by request id")
    stream.add_argument("request_id")
    stream.add_argument("--after", type=int, default=-1, help="resume after this seq")
    stream.add_argument("--json", action="store_true", help="every event as a JSON line")
    _url_flag(stream)
    stream.set_defaults(run=client.stream)

    replay = commands.add_parser("replay", help="replay a finished stream")
    replay.add_argument("request_id")
    replay.add_argument("--json", action="store_true", help="every event as a JSON line")
    replay.add_argument(
        "--pace", choices=["fast", "original"], default="fast",
        help="original: with the recorded timing between events",
    )  # fmt: skip
    _url_flag(replay)
    replay.set_defaults(run=client.replay)

    cancel = commands.add_parser("cancel", help="stop generating a request")
    cancel.add_argument("request_id")
    _url_flag(cancel)
    cancel.set_defaults(run=client.cancel)


def _audit_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit_cmd = commands.add_parser("audit", help="the audit consumer and its tools")
    audits = audit_cmd.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    run = audits.add_parser("run", help="the audit consumer")
    run.add_argument("--from-beginning", action="store_true",
                     help="read the whole log again (rebuilds a fresh store) "
                          "[TOKENBUS_AUDIT_FROM_BEGINNING]")  # fmt: skip
    run.set_defaults(run=audit.run)
    verify = audits.add_parser("verify", help="check every chain and checkpoint; 1 if tampered")
    verify.add_argument("--public-key", help="hex or base64 [TOKENBUS_AUDIT_PUBLIC_KEY]")
    verify.add_argument("--witness", action="store_true",
                        help="also compare with the checkpoints published to "
                             "tokenbus.audit-checkpoints (KAFKA_BOOTSTRAP_SERVERS)")  # fmt: skip
    verify.add_argument("--expect-checkpoint", type=audit.checkpoint_ref, metavar="N:HASH",
                        help="a checkpoint the store must hold, as noted elsewhere")  # fmt: skip
    verify.set_defaults(run=audit.verify)
    show = audits.add_parser("show", help="one request: prompt, model, workers, text, timings")
    show.add_argument("request_id", type=uuid.UUID)
    show.set_defaults(run=audit.show)
    export = audits.add_parser("export", help="records as JSON lines, by submission time")
    export.add_argument("--since", type=audit.when, help="ISO date or time (UTC unless given)")
    export.add_argument("--until", type=audit.when, help="ISO date or time, exclusive")
    export.set_defaults(run=audit.export)
    audits.add_parser("keygen", help="print a new signing key pair").set_defaults(run=audit.keygen)
    for sub in (run, verify, show, export):
        sub.add_argument("--store", help="SQLite path or postgresql:// URL [TOKENBUS_AUDIT_STORE]")


def _server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, help="HTTP port [TOKENBUS_PORT, default 8000]")
    parser.add_argument("--host", help="HTTP address [TOKENBUS_HOST, default 127.0.0.1]")


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="local transformers model directory [TOKENBUS_MODEL]")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="[TOKENBUS_DEVICE]")


def _url_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="tokenbus API [TOKENBUS_URL, default http://127.0.0.1:8000]")
    parser.add_argument(
        "--api-key",
        help="sent as Authorization: Bearer, where the server has keys [TOKENBUS_API_KEY]",
    )
