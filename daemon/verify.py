"""`drstream verify`: walk a log's chain and report every problem by log_id and seq.

Without keys it checks what anyone may check: contiguous seqs, each header naming its own
log and seq, and each prev_digest matching the SHA-256 of the segment before. With
`deep` it also authenticates and decodes every segment (MAC, zstd, records) and every
blob a segment names (registry state snapshots, model file chunks): a registry can only
be rebuilt if each of them is there and intact.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from drstream.daemon.audit import pruned_ranges, uncovered
from drstream.daemon.blobs import BlobStore
from drstream.daemon.codec import Body, EventBatch
from drstream.daemon.config import Config
from drstream.daemon.deltalog import DeltaLog
from drstream.daemon.errors import (
    ChainError,
    DrstreamError,
    SegmentAuthError,
    StoreError,
    UnknownKeyError,
)
from drstream.daemon.keyring import KeyRing
from drstream.daemon.layout import segments_prefix, seq_from_key
from drstream.daemon.plugins import Connectors, installed
from drstream.daemon.segment import (
    SegmentHeader,
    chain_break,
    decode_segment,
    parse_header,
    segment_digest,
)
from drstream.daemon.status import LogHead, log_findings, peek_checkpoints

VERIFY_PREFETCH: Final = 8
BLOB_CHECKS_IN_FLIGHT: Final = 8


@dataclass
class Problem:
    log_id: str
    seq: int | None
    kind: str  # gap, format, chain, moved, auth, key, missing, stray, blob, unreadable,
    # hidden (deleted in a versioned store, bytes kept), truncated, rewritten
    message: str

    def __str__(self) -> str:
        where = f"seq {self.seq}" if self.seq is not None else "log"
        return f"{self.log_id} {where}: {self.kind}: {self.message}"


@dataclass
class Report:
    log_id: str
    deep: bool
    segments: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    first_created_ms: int | None = None
    last_created_ms: int | None = None
    key_ids: set[str] = field(default_factory=set)
    records: int = 0
    heartbeats: int = 0
    min_record_ms: int | None = None
    max_record_ms: int | None = None
    plaintext_bytes: int = 0
    stored_bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # a stale log
    blob_refs: dict[str, int] = field(default_factory=dict)  # blob id -> first naming seq
    blobs_checked: int = 0
    # offsets a source lost before shipping them (retention), as the log records them:
    # not a fault of the log, but what an audit of completeness must see
    source_gaps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.segments > 0

    def to_json(self) -> dict[str, Any]:
        return {
            "log_id": self.log_id, "ok": self.ok, "deep": self.deep,
            "segments": self.segments, "first_seq": self.first_seq, "last_seq": self.last_seq,
            "first_created_ms": self.first_created_ms, "last_created_ms": self.last_created_ms,
            "key_ids": sorted(self.key_ids), "stored_bytes": self.stored_bytes,
            "records": self.records if self.deep else None,
            "heartbeats": self.heartbeats if self.deep else None,
            "min_record_ms": self.min_record_ms, "max_record_ms": self.max_record_ms,
            "blobs": self.blobs_checked if self.deep else None,
            "source_gaps": self.source_gaps if self.deep else None,
            "problems": [p.__dict__ for p in self.problems],
            "warnings": self.warnings,
        }


Progress = Callable[[Report], None]


async def _seqs(log: DeltaLog, report: Report, from_seq: int, to_seq: int | None) -> list[int]:
    """Segment seqs in range, from a LIST (verify is an audit: it must see every object)."""
    seqs = []
    start_after = log.key(from_seq - 1) if from_seq > 1 else None
    async for key in log.store.list(segments_prefix(log.log_id), start_after=start_after):
        seq = seq_from_key(key)
        if seq is None:
            report.problems.append(Problem(log.log_id, None, "stray", f"unexpected object {key}"))
            continue
        if to_seq is not None and seq > to_seq:
            break
        seqs.append(seq)
    return seqs


async def _fetch(log: DeltaLog, seq: int) -> bytes | StoreError | None:
    """The segment, or the store's refusal to read it (too large, a link): a problem to
    report, not the end of the audit."""
    try:
        return await log.fetch(seq)
    except StoreError as e:
        if e.retriable:
            raise
        return e


async def _fetch_ahead(log: DeltaLog, seqs: list[int]
                       ) -> AsyncIterator[tuple[int, bytes | StoreError | None]]:
    """Fetch in order with a bounded number of GETs running ahead."""
    pending: list[asyncio.Task[bytes | StoreError | None]] = []
    it = iter(seqs)
    for seq in it:
        pending.append(asyncio.create_task(_fetch(log, seq)))
        if len(pending) >= VERIFY_PREFETCH:
            break
    order = seqs[: len(pending)]
    idx = len(pending)
    try:
        while pending:
            data = await pending.pop(0)
            yield order.pop(0), data
            if idx < len(seqs):
                pending.append(asyncio.create_task(_fetch(log, seqs[idx])))
                order.append(seqs[idx])
                idx += 1
    finally:
        for task in pending:
            task.cancel()


def _check_header(report: Report, seq: int, data: bytes) -> SegmentHeader | None:
    try:
        header, _ = parse_header(data, expect_log_id=report.log_id, expect_seq=seq)
    except DrstreamError as e:
        report.problems.append(Problem(report.log_id, seq, "format", str(e)))
        return None
    if header.log_id != report.log_id or header.seq != seq:
        report.problems.append(Problem(
            report.log_id, seq, "moved",
            f"header says log {header.log_id!r} seq {header.seq}: segment moved or copied",
        ))
    return header


def _check_link(report: Report, seq: int, header: SegmentHeader, prev: bytes | None) -> None:
    why = chain_break(seq, header, prev)
    if why is not None:
        report.problems.append(Problem(report.log_id, seq, "chain", why))


_DEEP_KINDS: Final = ((UnknownKeyError, "key"), (SegmentAuthError, "auth"), (ChainError, "moved"))


def _check_deep(report: Report, seq: int, data: bytes, keyring: KeyRing,
                connectors: Connectors) -> None:
    try:
        _, body = decode_segment(data, keyring, expect_log_id=report.log_id, expect_seq=seq)
    except DrstreamError as e:
        kind = next((k for cls, k in _DEEP_KINDS if isinstance(e, cls)), "format")
        report.problems.append(Problem(report.log_id, seq, kind, str(e)))
        return
    for bid in blob_refs(body, connectors):
        report.blob_refs.setdefault(bid, seq)
    m = body.manifest
    for stream, extra in m.extra.items():
        gaps = extra.get("gaps") if isinstance(extra, dict) else None
        for topic, parts in (gaps or {}).items():
            for p, (first, end) in parts.items():
                report.source_gaps.append({"seq": seq, "stream": stream, "topic": topic,
                                           "partition": int(p), "first": first, "end": end})
    report.records += m.record_count
    report.heartbeats += m.kind == "heartbeat"
    if m.min_timestamp_ms is not None:
        report.min_record_ms = min(m.min_timestamp_ms, report.min_record_ms or m.min_timestamp_ms)
    if m.max_timestamp_ms is not None:
        report.max_record_ms = max(m.max_timestamp_ms, report.max_record_ms or m.max_timestamp_ms)


def blob_refs(body: Body, connectors: Connectors) -> set[str]:
    """Blob ids a segment names, through each stream's positions and events, as the kind
    of each stream reads them (registry state snapshots, model file chunks)."""
    events: dict[str, list[dict[str, Any]]] = {}
    for b in body.batches:
        if isinstance(b, EventBatch):
            events.setdefault(b.stream, []).extend(b.events)
    refs: set[str] = set()
    for stream in sorted(set(body.manifest.positions) | set(events)):
        kind = connectors.kind_of(stream)
        if kind is not None:
            refs |= kind.blob_refs(body.manifest.positions.get(stream), events.get(stream, []))
    return refs


async def _check_blobs(report: Report, blobs: BlobStore) -> None:
    """Fetch, authenticate and hash every named blob, a bounded number at a time."""
    gate = asyncio.Semaphore(BLOB_CHECKS_IN_FLIGHT)

    async def check(bid: str, seq: int) -> None:
        async with gate:
            try:
                await blobs.get(bid)
            except DrstreamError as e:
                report.problems.append(Problem(report.log_id, seq, "blob", str(e)))
            report.blobs_checked += 1

    await asyncio.gather(*(check(b, s) for b, s in sorted(report.blob_refs.items())))


def _account(report: Report, seq: int, header: SegmentHeader, size: int) -> None:
    report.segments += 1
    report.stored_bytes += size
    report.key_ids.add(header.key_id)
    report.first_seq = seq if report.first_seq is None else report.first_seq
    report.last_seq = seq
    if report.first_created_ms is None:
        report.first_created_ms = header.created_at_ms
    report.last_created_ms = header.created_at_ms


async def verify_log(
    log: DeltaLog,
    *,
    keyring: KeyRing | None = None,
    deep: bool = False,
    from_seq: int = 1,
    to_seq: int | None = None,
    progress: Progress | None = None,
    connectors: Connectors | None = None,
) -> Report:
    """Walk the log's chain (and with `deep` every MAC, record and named blob, reading
    blob names as the `connectors`' stream kinds say; default: the installed ones)."""
    connectors = connectors if connectors is not None else installed()
    if deep and keyring is None:
        raise DrstreamError("verify --deep needs the key ring (--config or --key)")
    report = Report(log_id=log.log_id, deep=deep)
    seqs = await _seqs(log, report, from_seq, to_seq)
    if not seqs:
        report.problems.append(Problem(log.log_id, None, "missing", "no segments in range"))
        return report
    prev_seq, prev_digest = None, None
    async for seq, data in _fetch_ahead(log, seqs):
        if prev_seq is not None and seq != prev_seq + 1:
            report.problems.append(Problem(
                log.log_id, prev_seq + 1, "gap", f"segments {prev_seq + 1}..{seq - 1} are missing"
            ))
            prev_digest = None
        if data is None or isinstance(data, StoreError):  # gone while we ran, or refused
            report.problems.append(Problem(log.log_id, seq, "missing", "segment disappeared")
                                   if data is None else
                                   Problem(log.log_id, seq, "unreadable", str(data)))
            prev_seq, prev_digest = seq, None
            continue
        header = _check_header(report, seq, data)
        if header is not None:
            _check_link(report, seq, header, prev_digest)
            _account(report, seq, header, len(data))
            if deep and keyring is not None:
                await asyncio.to_thread(_check_deep, report, seq, data, keyring, connectors)
        prev_seq, prev_digest = seq, segment_digest(data)
        if progress is not None:
            progress(report)
    if deep and keyring is not None and report.blob_refs:
        await _check_blobs(report, BlobStore(log.store, log.log_id, keyring))
    await _check_removed(log, report, from_seq, deep)
    return report


async def _check_removed(log: DeltaLog, report: Report, from_seq: int, deep: bool) -> None:
    """What is gone without a gap to show it: segments missing before the first one that
    no `drstream prune` removed (its audit records say how far it went), and with `deep`
    segments a versioned store only hides behind a delete marker."""
    pruned = await pruned_ranges(log.store, log.log_id)
    first = report.first_seq
    lost = uncovered(1, first - 1, pruned) if from_seq <= 1 and first is not None else []
    if lost:
        seqs = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in lost)
        report.problems.append(Problem(
            log.log_id, lost[0][0], "missing",
            f"seqs {seqs} missing at the start of the log ({log.key(lost[0][0])}..): no "
            "`drstream prune` removed them"))
    if not deep:
        return
    async for key in log.store.hidden(segments_prefix(log.log_id)):
        seq = seq_from_key(key)
        if seq is not None and seq >= from_seq and uncovered(seq, seq, pruned):
            report.problems.append(Problem(
                log.log_id, seq, "hidden",
                f"{key} is deleted but its bytes are kept behind a delete marker (a "
                "versioned bucket): restore it by deleting the delete marker (README: "
                "hidden segments)"))
    report.problems.sort(key=lambda p: (p.seq is None, p.seq or 0))


async def check_readers(config: Config, log: DeltaLog, report: Report) -> None:
    """With the config: the log against its sinks' checkpoints (truncated, rewritten) and
    the age of its head (stale)."""
    head = LogHead(seq=report.last_seq, created_at_ms=report.last_created_ms)
    problems, warnings = await log_findings(config, log, head, await peek_checkpoints(config))
    for problem in problems:
        kind, _, message = problem.partition(": ")
        report.problems.append(Problem(log.log_id, None, kind, message))
    report.warnings += warnings
