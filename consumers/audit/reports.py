"""What `tokenbus audit show` and `tokenbus audit export` print."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from schemas import (
    FailedEvent,
    FinishedEvent,
    MalformedMessage,
    StartedEvent,
    TokenEvent,
    VerdictView,
    decode_event,
    decode_request,
    decode_verdict,
    is_terminal,
)

from .store import AuditStore, submitted_ms
from .verify import verify_request


def account(store: AuditStore, request_id: uuid.UUID) -> dict[str, Any] | None:
    """What the store holds of one request, as JSON-ready data (the console's audit
    view); None if it holds nothing of it. Not a verification: see `verify_request`."""
    request = store.request(request_id)
    events = store.events(request_id)
    if request is None and not events:
        return None
    when = datetime.fromtimestamp(submitted_ms(request_id) / 1000, tz=UTC)
    found: dict[str, Any] = {
        "request_id": str(request_id), "submitted_at": when.isoformat(), "request": None,
        "request_problem": None, "record_problems": [], "workers": [], "served_by": [],
        "outcome": None, "text": "", "events": [],
        "chain_head": events[-1].hash.hex() if events else None,
    }  # fmt: skip
    if request is None:
        found["request_problem"] = "no request message in the store: it was malformed or is missing"
    else:
        try:
            submitted = decode_request(request.value)
        except MalformedMessage as exc:
            found["request_problem"] = f"the stored request does not decode: {exc}"
        else:
            found["request"] = {
                "tenant": submitted.tenant, "model": submitted.model,
                "sampling": submitted.sampling.model_dump(mode="json"),
                "prompt": submitted.prompt,
                "messages": [m.model_dump(mode="json") for m in submitted.messages or []],
            }  # fmt: skip
    decoded = []
    for record in events:
        try:
            decoded.append(decode_event(record.value))
        except MalformedMessage as exc:  # only a tampered store holds one
            found["record_problems"].append(f"seq {record.seq} does not decode ({exc}): run verify")
    found["workers"] = [
        {"worker": worker, "attempt": attempt}
        for worker, attempt in sorted({(e.worker, e.attempt) for e in decoded})
    ]
    found["text"] = "".join(e.text for e in decoded if isinstance(e, TokenEvent))
    start = decoded[0].ts if decoded else None
    for event in decoded:
        if isinstance(event, StartedEvent):
            found["served_by"].append({
                "model": event.model, "model_revision": event.model_revision,
                "prompt_tokens": event.prompt_tokens, "queue_wait_ms": event.queue_wait_ms,
            })  # fmt: skip
        elif isinstance(event, FinishedEvent):
            found["outcome"] = {
                "type": "finished", "finish_reason": str(event.finish_reason),
                "completion_tokens": event.usage.completion_tokens,
                "ttft_ms": event.timings.ttft_ms, "total_ms": event.timings.total_ms,
            }  # fmt: skip
        elif isinstance(event, FailedEvent):
            found["outcome"] = {"type": "failed", "code": event.code, "message": event.message}
        found["events"].append({
            "seq": event.seq, "type": event.type,
            "offset_ms": (event.ts - start).total_seconds() * 1000 if start else 0.0,
            "text": event.text if isinstance(event, TokenEvent) else None,
        })  # fmt: skip
        if isinstance(event, FinishedEvent) and event.content_filter is not None:
            found["outcome"]["content_filter"] = event.content_filter.model_dump(mode="json")
    if decoded and not is_terminal(decoded[-1]):
        found["outcome"] = None
    found["moderation"] = _moderation(store, request_id, found["text"])
    return found


def _moderation(store: AuditStore, request_id: uuid.UUID, text: str) -> dict[str, Any] | None:
    """The guard's verdicts on the request, folded by the readers' fencing rule."""
    records = store.verdicts(request_id)
    if not records:
        return None
    view = VerdictView()
    fenced, guards, problems = 0, set(), []
    for record in records:
        try:
            verdict = decode_verdict(record.value)
        except MalformedMessage as exc:  # only a tampered store holds one
            problems.append(f"verdict {record.n} does not decode ({exc}): run verify")
            continue
        guards.add((verdict.guard, verdict.epoch))
        if not view.accept(verdict):
            fenced += 1
    return {
        "mode": view.mode.value if view.mode is not None else None,
        "judged_through": view.judged_through,
        "final": view.final,
        "verdicts": len(records),
        "fenced": fenced,  # a stale guard's, not counted
        "guards": [{"guard": g, "epoch": e} for g, e in sorted(guards)],
        "violations": [
            v.model_dump(mode="json") | {"text": text[v.span[0] : v.span[1]]}
            for v in view.violations
        ],
        "problems": problems,
        "chain_head": records[-1].hash.hex(),
    }


def show(store: AuditStore, request_id: uuid.UUID) -> str | None:
    """A human-readable account of one request; None if the store has nothing of it."""
    found = account(store, request_id)
    if found is None:
        return None
    lines = [f"request    {request_id}", f"submitted  {found['submitted_at']}"]
    if found["request_problem"] is not None:
        lines.append(f"prompt     ({found['request_problem']})")
    else:
        request = found["request"]
        lines.append(f"tenant     {request['tenant']}")
        lines.append(f"model      {request['model']} (as requested)")
        lines.append(f"parameters {_compact(request['sampling'])}")
        if request["prompt"] is not None:
            lines.append(f"prompt     {request['prompt']!r}")
        for i, message in enumerate(request["messages"]):
            label = "prompt" if i == 0 else ""
            lines.append(f"{label:<10} {message['role']}: {message['content']!r}")
    lines += [f"record     {problem}" for problem in found["record_problems"]]
    lines += [f"worker     {w['worker']} (attempt {w['attempt']})" for w in found["workers"]]
    for served in found["served_by"]:
        lines.append(f"served by  {served['model']} revision {served['model_revision']}")
        lines.append(f"           {served['prompt_tokens']} prompt tokens, "
                     f"queued {served['queue_wait_ms']:.0f} ms")  # fmt: skip
    outcome = found["outcome"]
    if outcome is None:
        lines.append("status     no terminal event (yet)")
    elif outcome["type"] == "finished":
        ttft = f"{outcome['ttft_ms']:.0f} ms" if outcome["ttft_ms"] is not None else "-"
        lines.append(
            f"finished   {outcome['finish_reason']}: {outcome['completion_tokens']} tokens, "
            f"ttft {ttft}, total {outcome['total_ms']:.0f} ms"
        )
    else:
        lines.append(f"failed     {outcome['code']}: {outcome['message']}")
    if outcome is not None and outcome.get("content_filter"):
        cut = outcome["content_filter"]
        lines.append(f"           cut by the guard: {cut['category']} ({cut['policy']}, "
                     f"policy version {cut['policy_version']}) at seq {cut['seq']}")  # fmt: skip
    lines += _moderation_lines(found["moderation"])
    lines.append(f"text       {found['text']!r}")
    lines.append("events     seq  +ms      type      text")
    for event in found["events"]:
        shown = repr(event["text"]) if event["text"] is not None else ""
        lines.append(
            f"           {event['seq']:<4} {event['offset_ms']:<8.1f} {event['type']:<9} {shown}"
        )
    if found["chain_head"] is not None:
        lines.append(f"chain head {found['chain_head']}")
    return "\n".join(lines)


def _moderation_lines(moderation: dict[str, Any] | None) -> list[str]:
    if moderation is None:
        return ["guard      no verdicts"]
    final = ", final" if moderation["final"] else ""
    stale = moderation["fenced"]
    fenced = f" ({stale} from a stale guard, not counted)" if stale else ""
    lines = [
        f"guard      mode {moderation['mode']}: judged through seq "
        f"{moderation['judged_through']}{final}; {moderation['verdicts']} verdicts{fenced}"
    ]
    for v in moderation["violations"]:
        lines.append(
            f"violation  seq {v['seq']}..{v['end_seq']} {v['category']} ({v['policy']}, "
            f"policy version {v['policy_version']}): chars {v['span'][0]}..{v['span'][1]} "
            f"{v['text']!r}"
        )
    lines += [f"verdict    {problem}" for problem in moderation["problems"]]
    lines.append(f"verdicts   chain head {moderation['chain_head']}")
    return lines


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def export_jsonl(
    store: AuditStore, *, since: datetime | None = None, until: datetime | None = None
) -> Iterator[str]:
    """One JSON line per record, the request first, then its events by seq, then the
    guard's verdicts on it in log order (``seq``: the verdict's number); each with its
    hash and the message exactly as logged (``message``)."""
    since_ms = int(since.timestamp() * 1000) if since else 0
    until_ms = int(until.timestamp() * 1000) if until else None
    for request_id in store.request_ids(since_ms=since_ms, until_ms=until_ms):
        request = store.request(request_id)
        if request is not None:
            yield _line(kind="request", request_id=str(request_id), seq=None,
                        hash=request.digest.hex(), message=_json(request.value))  # fmt: skip
        for event in store.events(request_id):
            yield _line(kind="event", request_id=str(request_id), seq=event.seq,
                        hash=event.hash.hex(), message=_json(event.value))  # fmt: skip
        for verdict in store.verdicts(request_id):
            yield _line(kind="verdict", request_id=str(request_id), seq=verdict.n,
                        hash=verdict.hash.hex(), message=_json(verdict.value))  # fmt: skip


def _json(value: bytes) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value.decode(errors="replace")


def _line(**fields: Any) -> str:
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))


def audited(
    store: AuditStore, public_key: Ed25519PublicKey | None, request_id: uuid.UUID
) -> dict[str, Any] | None:
    """`account`, and whether the request's records verify (`verify_request`) under
    ``public_key`` (None: no key to check with, so not verified, and said why)."""
    found = account(store, request_id)
    if found is None:
        return None
    if public_key is None:
        found["verification"] = {"verified": None, "findings": [], "uncovered_records": None}
        return found
    report = verify_request(store, public_key, request_id)
    found["verification"] = {
        "verified": report.clean,
        "findings": [str(finding) for finding in report.findings],
        # Checkpoints come every TOKENBUS_AUDIT_CHECKPOINT_EVERY_S: the newest records
        # are held and chained, but not signed for until the next one.
        "uncovered_records": report.uncovered,
        "checkpoints": report.checkpoints,
    }
    return found
