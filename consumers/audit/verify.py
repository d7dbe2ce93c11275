"""Checking a store: every chain recomputed, every checkpoint checked and folded.

What each kind of tampering looks like, and the finding that names it:

- a changed byte in a record: its hash no longer follows from its content
  (``altered``, at that seq), or, if every later hash was recomputed too, the chain
  no longer ends in the head a checkpoint committed (``rewritten``, between the
  seqs of the last checkpoint that still matches and the first that does not);
- a deleted record: a gap in the seqs (``missing``, at the first absent seq);
- an inserted or reordered record: a row whose content is another seq's event
  (``moved``), or a record after the terminal event (``inserted``);
- a cut-off tail: fewer records than a checkpoint committed (``truncated``);
- a deleted request: a request a checkpoint committed with none of it left, or
  without its request message (``deleted``);
- a forged or altered checkpoint: its hash, its leaves or its signature under the
  trusted public key do not hold, or it does not follow the previous one
  (``checkpoint``).

The guard's verdicts on a request are a chain of their own, checked the same way
(a finding about one names ``verdict N`` in its message): altered, missing, moved,
truncated and rewritten, against the verdict leaves of the checkpoints.

Records written after the last checkpoint are protected by their chain hashes
only; the consumer checkpoints on a clean stop, so that window is a crash's.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from schemas import MalformedMessage, decode_event, decode_request, decode_verdict, is_terminal

from .chain import (
    GENESIS,
    NO_REQUEST,
    Leaf,
    VerdictLeaf,
    delta_digest,
    event_hash,
    request_digest,
    verdict_hash,
)
from .keys import signature_valid
from .records import EventRecord, RequestRecord, StreamState, VerdictChain, VerdictRecord
from .store import AuditStore


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str  # altered, rewritten, missing, moved, inserted, truncated, deleted, checkpoint, state
    message: str
    request_id: uuid.UUID | None = None
    seq: int | None = None
    checkpoint: int | None = None

    def __str__(self) -> str:
        where = []
        if self.checkpoint is not None and self.request_id is None:
            where.append(f"checkpoint {self.checkpoint}")
        if self.request_id is not None:
            where.append(f"request {self.request_id}")
        if self.seq is not None:
            where.append(f"seq {self.seq}")
        return f"{self.kind}: {' '.join(where)}: {self.message}"


@dataclass(slots=True)
class Report:
    findings: list[Finding] = field(default_factory=list)
    requests: int = 0
    records: int = 0
    checkpoints: int = 0
    uncovered: int = 0  # records not (yet) committed by any checkpoint

    @property
    def clean(self) -> bool:
        return not self.findings


class _Bad(Protocol):
    def __call__(
        self, kind: str, message: str, seq: int | None = None, checkpoint: int | None = None
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class _Committed:
    leaf: Leaf
    checkpoint: int


@dataclass(frozen=True, slots=True)
class _CommittedVerdicts:
    leaf: VerdictLeaf
    checkpoint: int


@dataclass(slots=True)
class _Commitments:
    records: dict[uuid.UUID, list[_Committed]] = field(default_factory=lambda: defaultdict(list))
    verdicts: dict[uuid.UUID, list[_CommittedVerdicts]] = field(
        default_factory=lambda: defaultdict(list)
    )


def verify(
    store: AuditStore, public_key: Ed25519PublicKey, *, stale_before: datetime | None = None
) -> Report:
    """With ``stale_before``, records from before then that no checkpoint covers are a
    finding (``uncovered``): the consumer checkpoints every few seconds, so old
    uncovered records mean deleted checkpoints (or a consumer long down)."""
    report = Report()
    committed = _fold_checkpoints(store, public_key, report)
    states = store.stream_states()
    chains = store.all_verdict_chains()
    ids = set(store.request_ids()) | committed.records.keys() | committed.verdicts.keys()
    for request_id in sorted(ids | states.keys() | chains.keys()):
        report.requests += 1
        _check_request(
            store, request_id, committed.records.get(request_id, []), report, states, stale_before
        )
        _check_verdicts(store, request_id, committed.verdicts.get(request_id, []), report, chains)
    return report


def verify_request(
    store: AuditStore, public_key: Ed25519PublicKey, request_id: uuid.UUID
) -> Report:
    """One request: its records' chain, and the checkpoints that commit to it (their
    own chain, hashes and signatures, and what they commit). Checkpoints that do not
    name it are checked for their place in the chain and signature, not their leaves;
    `verify` checks everything."""
    report = Report(requests=1)
    naming = set(store.checkpoints_naming(request_id))
    committed = _fold_checkpoints(store, public_key, report, only=naming)
    _check_request(
        store, request_id, committed.records.get(request_id, []), report,
        store.streams([request_id]),
    )  # fmt: skip
    _check_verdicts(store, request_id, committed.verdicts.get(request_id, []), report,
                    store.verdict_chains([request_id]))  # fmt: skip
    return report


def _fold_checkpoints(
    store: AuditStore,
    public_key: Ed25519PublicKey,
    report: Report,
    only: set[int] | None = None,
) -> _Commitments:
    """Every request's committed (count, head) of records and of verdicts at each
    checkpoint that named it; ``only``: the checkpoints whose leaves are read and
    checked (default: all)."""
    committed = _Commitments()
    previous, expected = GENESIS, 1
    for checkpoint in store.checkpoints():
        report.checkpoints += 1
        body = checkpoint.body
        read = only is None or body.number in only
        leaves = store.checkpoint_leaves(body.number) if read else None
        verdict_leaves = store.checkpoint_verdict_leaves(body.number) if read else []
        problem = None
        if body.number != expected:
            problem = f"checkpoint {expected} is missing (the next one held is {body.number})"
        elif body.previous != previous:
            problem = "does not follow the previous checkpoint: one was removed or replaced"
        elif body.hash() != checkpoint.hash:
            problem = "its fields do not match its hash: altered"
        elif leaves is not None and delta_digest(leaves, verdict_leaves) != body.delta:
            problem = "the requests it commits to were altered, added or removed"
        elif not signature_valid(public_key, checkpoint.signature, body.hash()):
            problem = "bad signature under the trusted public key: forged or altered"
        if problem is not None:
            report.findings.append(Finding("checkpoint", problem, checkpoint=body.number))
        for leaf in leaves or ():
            committed.records[leaf.request_id].append(_Committed(leaf, body.number))
        for verdict_leaf in verdict_leaves:
            committed.verdicts[verdict_leaf.request_id].append(
                _CommittedVerdicts(verdict_leaf, body.number)
            )
        previous, expected = checkpoint.hash, body.number + 1
    return committed


def _check_request(
    store: AuditStore,
    request_id: uuid.UUID,
    commitments: Sequence[_Committed],
    report: Report,
    states: dict[uuid.UUID, StreamState],
    stale_before: datetime | None = None,
) -> None:
    request = store.request(request_id)
    events = store.events(request_id)
    report.records += len(events)
    found = len(report.findings)

    def bad(kind: str, message: str, seq: int | None = None, checkpoint: int | None = None) -> None:
        report.findings.append(Finding(kind, message, request_id, seq, checkpoint))

    latest = commitments[-1] if commitments else None
    if latest is not None and request is None and not events:
        bad("deleted", f"none of it is left; checkpoint {latest.checkpoint} committed "
            f"{latest.leaf.count} records", checkpoint=latest.checkpoint)  # fmt: skip
        return
    if request is not None:
        _check_request_message(request, latest, bad)
    elif latest is not None and latest.leaf.request_digest != NO_REQUEST:
        bad("deleted", f"the request message is gone; checkpoint {latest.checkpoint} committed "
            "it", checkpoint=latest.checkpoint)  # fmt: skip

    heads = _check_chain(request_id, events, bad)
    if len(report.findings) > found:
        return  # the first bad record is named; what follows it cannot be trusted
    for commitment in commitments:
        count, number = commitment.leaf.count, commitment.checkpoint
        if len(heads) < count:
            bad("truncated", f"records {len(heads)}..{count - 1} are missing: checkpoint {number} "
                f"committed {count}", seq=len(heads), checkpoint=number)  # fmt: skip
            return
        if count and heads[count - 1] != commitment.leaf.head:
            good = _last_matching(commitments, heads, before=commitment)
            bad("rewritten", f"records seq {good}..{count - 1} were rewritten with new hashes: "
                f"the chain no longer ends in the head checkpoint {number} committed",
                seq=good, checkpoint=number)  # fmt: skip
            return
    covered = latest.leaf.count if latest else 0
    report.uncovered += len(heads) - covered
    if stale_before is not None and len(heads) > covered:
        oldest = decode_event(events[covered].value).ts  # decoded fine in the chain check
        if oldest < stale_before:
            since = oldest.isoformat(timespec="seconds")
            bad("uncovered", f"records seq {covered}..{len(heads) - 1} date from {since} and no "
                "checkpoint covers them: checkpoints were deleted (or the consumer has not "
                "checkpointed since); compare with --witness", seq=covered)  # fmt: skip
    state = states.get(request_id)
    expected_head = heads[-1] if heads else GENESIS
    if state is not None and (state.next_seq, state.head) != (len(heads), expected_head):
        bad("state", "the consumer's resume state does not match the records (it would resume "
            "at the wrong place)", seq=len(heads))  # fmt: skip


def _check_verdicts(
    store: AuditStore,
    request_id: uuid.UUID,
    commitments: Sequence[_CommittedVerdicts],
    report: Report,
    chains: dict[uuid.UUID, VerdictChain],
) -> None:
    """The request's verdict chain, against what the checkpoints committed."""
    verdicts = store.verdicts(request_id)
    report.records += len(verdicts)

    def bad(kind: str, message: str, checkpoint: int | None = None) -> None:
        report.findings.append(Finding(kind, message, request_id, None, checkpoint))

    heads = _verdict_heads(request_id, verdicts, bad)
    if heads is None:
        return
    for commitment in commitments:
        count, number = commitment.leaf.count, commitment.checkpoint
        if len(heads) < count:
            bad("truncated", f"verdicts {len(heads)}..{count - 1} are missing: checkpoint "
                f"{number} committed {count}", checkpoint=number)  # fmt: skip
            return
        if count and heads[count - 1] != commitment.leaf.head:
            bad("rewritten", f"verdicts before verdict {count} were rewritten: the chain no "
                f"longer ends in the head checkpoint {number} committed",
                checkpoint=number)  # fmt: skip
            return
    report.uncovered += len(heads) - (commitments[-1].leaf.count if commitments else 0)
    chain = chains.get(request_id)
    if chain is not None and (chain.count, chain.head) != (len(heads), heads[-1] if heads
                                                           else GENESIS):  # fmt: skip
        bad("state", "the consumer's verdict chain state does not match the verdicts held")


def _verdict_heads(
    request_id: uuid.UUID,
    verdicts: Sequence[VerdictRecord],
    bad: Callable[[str, str], None],
) -> list[bytes] | None:
    """The chain head after each verdict; None once a bad one is named."""
    heads: list[bytes] = []
    head = GENESIS
    for expected, record in enumerate(verdicts):
        if record.n != expected:
            bad("missing", f"verdict {expected} is missing (the next one held is {record.n})")
            return None
        try:
            verdict = decode_verdict(record.value)
        except MalformedMessage as exc:
            bad("altered", f"verdict {record.n} no longer decodes: {exc}")
            return None
        if verdict.request_id != request_id:
            bad("moved", f"verdict {record.n} is one of request {verdict.request_id}")
            return None
        head = verdict_hash(head, request_id, record.n, record.value)
        if head != record.hash:
            bad("altered", f"verdict {record.n} does not match its chain hash")
            return None
        heads.append(head)
    return heads


def _check_request_message(request: RequestRecord, latest: _Committed | None, bad: _Bad) -> None:
    rid = request.request_id
    if request_digest(rid, request.value) != request.digest:
        bad("altered", "the request message does not match its digest")
        return
    try:
        if decode_request(request.value).request_id != rid:
            bad("moved", "the request message is another request's")
            return
    except MalformedMessage as exc:
        bad("altered", f"the request message no longer decodes: {exc}")
        return
    if latest is not None and latest.leaf.request_digest not in (NO_REQUEST, request.digest):
        bad("rewritten", "the request message differs from what checkpoint "
            f"{latest.checkpoint} committed", checkpoint=latest.checkpoint)  # fmt: skip


def _check_chain(request_id: uuid.UUID, events: Sequence[EventRecord], bad: _Bad) -> list[bytes]:
    """The chain head after each good record, up to the first bad one (named)."""
    heads: list[bytes] = []
    head, terminal = GENESIS, None
    for expected, record in enumerate(events):
        if record.seq != expected:
            bad("missing", f"record seq {expected} is missing (the next one held is seq "
                f"{record.seq})", seq=expected)  # fmt: skip
            break
        try:
            event = decode_event(record.value)
        except MalformedMessage as exc:
            bad("altered", f"the record no longer decodes: {exc}", seq=record.seq)
            break
        if (event.request_id, event.seq) != (request_id, record.seq):
            holds = f"the event seq {event.seq} of request {event.request_id}"
            bad("moved", f"the record holds {holds}: records were reordered or inserted",
                seq=record.seq)  # fmt: skip
            break
        computed = event_hash(head, request_id, record.seq, record.value)
        if computed != record.hash:
            bad("altered", "the record does not match its chain hash", seq=record.seq)
            break
        if terminal is not None:
            bad("inserted", f"a record after the terminal event (seq {terminal})", seq=record.seq)
            break
        if is_terminal(event):
            terminal = record.seq
        head = computed
        heads.append(head)
    return heads


def _last_matching(
    commitments: Sequence[_Committed], heads: Sequence[bytes], *, before: _Committed
) -> int:
    """The first seq not vouched for by an earlier checkpoint that still matches."""
    good = 0
    for commitment in commitments:
        if commitment is before:
            break
        count = commitment.leaf.count
        if count and count <= len(heads) and heads[count - 1] == commitment.leaf.head:
            good = count
    return good
