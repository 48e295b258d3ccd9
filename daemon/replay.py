"""`replay`, `drill` and `prune`: rebuild state from the log at any point, prove it, trim it.

Replay is apply with a filter and a different sink: the changes of one stream up to a
time or through a seq, written to a target of the replay's own choosing under its own
checkpoint (so an interrupted replay resumes with no duplicates). What "a change", "up to
a time" and "the target" mean belongs to the stream's kind: the connector whose source
wrote the stream (daemon.plugins.StreamKind) supplies the filter, the target sink and the
drill comparison. A drill replays into a scratch target, compares it with the log and
reports RTO, RPO and mismatches.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from daemon.applier import Applier
from daemon.audit import store_report
from daemon.blobs import BlobStore
from daemon.codec import Body
from daemon.config import Config
from daemon.deltalog import DeltaLog
from daemon.errors import ConfigFieldError, DrstreamError
from daemon.keyring import KeyRing
from daemon.lifecycle import Closing
from daemon.logging import get_logger
from daemon.plugins import ConnectorConfig, Drill, StreamFilter
from daemon.records import Checkpoint
from daemon.segment import parse_header, read_manifest
from daemon.store import Store

log = get_logger("drstream.replay")

DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
REPLAY_POLL_MAX_S = 0.2  # a replay reads a log that is already there: probe often


def parse_time_ms(text: str, field_name: str = "--until") -> int:
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigFieldError(field_name, text, "expected an RFC 3339 time such as "
                               "2026-11-26T12:00:00Z") from None
    if dt.tzinfo is None:
        raise ConfigFieldError(field_name, text, "the time needs a zone (Z or +hh:mm)")
    return int(dt.timestamp() * 1000)


def parse_duration_s(text: str, field_name: str = "--older-than") -> float:
    m = DURATION_RE.match(text.strip())
    if not m:
        raise ConfigFieldError(field_name, text, "expected a duration like 90s, 30m, 12h, 7d")
    return float(m.group(1)) * DURATION_UNITS[m.group(2)]


@dataclass(frozen=True)
class ReplayPlan:
    stream: str
    until_ms: int | None = None
    until_seq: int | None = None
    name: str = "replay"
    parallel: int = 4
    # the stream kind's own options by flag ("--topics": "orders.*"); None: not given
    options: Mapping[str, str | None] = field(default_factory=dict)
    dry_run: bool = False  # count what would be written; write nothing
    digests: bool = False  # drills: hash every kept record per partition
    fold: bool = False  # drills: fold the kept changes into the expected state

    def option(self, flag: str, default: str | None = None) -> str | None:
        value = self.options.get(flag)
        return default if value is None else value


class DryRunSink(Closing):
    """Counts what a replay would write; writes nothing, keeps no checkpoint."""

    name = "dry-run"

    def __init__(self) -> None:
        self._cp = Checkpoint()

    async def start(self) -> Checkpoint:
        return self._cp

    async def apply(self, seq: int, digest: bytes, created_at_ms: int, body: Body) -> None:
        self._cp = Checkpoint(seq=seq, digest=digest, created_at_ms=created_at_ms)

    def checkpoint(self) -> Checkpoint:
        return self._cp

    async def peek(self) -> Checkpoint:
        return self._cp

    async def sync_groups(self, force: bool = False) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        return None


def replay_config(base: Config, plan: ReplayPlan, sinks: list[ConnectorConfig]) -> Config:
    """The base config with the replay's sinks (none for a dry run), fetching ahead
    `plan.parallel` segments."""
    apply = base.apply.model_copy(update={"prefetch": plan.parallel,
                                          "poll_max_s": REPLAY_POLL_MAX_S})
    return base.model_copy(update={"sinks": sinks, "apply": apply})


@dataclass
class ReplayResult:
    through_seq: int
    end_seq: int
    records: int
    bytes: int
    seconds: float
    filter: StreamFilter
    applier: Applier


Progress = Callable[[int, int, int, int, float], None]  # seq, end, records, bytes, elapsed


async def pruned_start(store: Store, keyring: KeyRing, log_id: str, stream: str
                       ) -> tuple[int, Any] | None:
    """(seq, the stream's positions) of the oldest stored segment when the log was pruned
    (its first segment is not seq 1); None otherwise."""
    log_ = DeltaLog(store, log_id)
    first = await log_.first_seq()
    if first is None or first == 1:
        return None
    data = await log_.fetch(first)
    if data is None:
        raise DrstreamError(f"replay: segment {first} of log {log_id} vanished while starting")
    _, manifest = read_manifest(data, keyring, expect_log_id=log_id, expect_seq=first)
    return first, manifest.positions.get(stream, {})


async def replay(config: Config, store: Store, keyring: KeyRing, plan: ReplayPlan,
                 progress: Progress | None = None,
                 on_filter: Callable[[StreamFilter], None] | None = None) -> ReplayResult:
    """Replay the plan's stream into the target its options name (a dry run counts only).
    `on_filter` sees the filter before anything is written (a drill cleans up after it)."""
    kind = config.connectors.stream(plan.stream)
    blobs = BlobStore(store, config.log_id, keyring)

    def first() -> Awaitable[tuple[int, Any] | None]:
        return pruned_start(store, keyring, config.log_id, plan.stream)

    sinks = [] if plan.dry_run else [kind.target(plan, f"replay-{plan.name}")]
    applier = Applier(replay_config(config, plan, sinks), store, keyring)
    if plan.dry_run:
        applier.sinks = [DryRunSink()]
    filt = await kind.filter(plan, blobs, first)
    if on_filter is not None:
        on_filter(filt)
    applier.transform = filt
    head = await DeltaLog(store, config.log_id).head_seq()
    end = min(head or 0, plan.until_seq) if plan.until_seq is not None else (head or 0)
    started = time.monotonic()
    reporter = asyncio.create_task(_report(applier, filt, end, started, progress))
    try:
        last = await applier.run(asyncio.Event(), until_seq=end) if end > 0 else 0
    finally:
        reporter.cancel()
        await applier.close()
    elapsed = time.monotonic() - started
    if progress is not None:
        progress(last, end, filt.count, filt.bytes, elapsed)
    return ReplayResult(last, end, filt.count, filt.bytes, elapsed, filt, applier)


async def _report(applier: Applier, filt: StreamFilter, end: int, started: float,
                  progress: Progress | None) -> None:
    while progress is not None:
        await asyncio.sleep(1.0)
        progress(applier.progress.applied_seq, end, filt.count, filt.bytes,
                 time.monotonic() - started)


@dataclass
class DrillReport:
    """A drill's stored report (`doc`) and the kind's lines for a person (`lines`)."""

    doc: dict[str, Any]
    lines: list[str]

    @property
    def ok(self) -> bool:
        return bool(self.doc["ok"])


def drill_stamp() -> str:
    """Unique per drill: scratch names, transactional id and checkpoint never collide."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.urandom(3).hex()}"


async def drill(config: Config, store: Store, keyring: KeyRing, d: Drill, keep: bool,
                progress: Progress | None = None) -> DrillReport:
    """Replay a stream into the drill's scratch target, compare it with the log, report
    RTO/RPO/mismatches and store the report under audit/."""
    plan = d.plan
    report: dict[str, Any] = {"action": "drill", "log_id": config.log_id, "at_ms": _now_ms(),
                              "target": d.target, "until_ms": plan.until_ms,
                              "until_seq": plan.until_seq, **d.report}
    async with d:
        started = time.monotonic()
        seen: list[StreamFilter] = []
        try:
            result = await replay(config, store, keyring, d.plan, progress, seen.append)
        except DrstreamError as e:
            report.update(ok=False, error=str(e), rto_s=round(time.monotonic() - started, 3))
            if not keep:  # what the failed replay wrote so far
                report.update(await d.clean(seen[0] if seen else None))
            return await _finish(store, config, report, d.lines(report))
        report["rto_s"] = round(result.seconds, 3)
        check = await d.compare(result.filter)
        newest = result.filter.newest_ms
        point = plan.until_ms if plan.until_ms is not None else await _segment_time(
            store, config.log_id, result.through_seq)
        report.update(
            ok=not check.mismatches, applied_through_seq=result.through_seq,
            records=result.records, **check.fields, mismatches=check.mismatches,
            rpo_at_point_s=None if newest is None or point is None
            else max(0.0, (point - newest) / 1000),
        )
        if not keep:
            report.update(await d.clean(result.filter))
    return await _finish(store, config, report, d.lines(report))


async def _finish(store: Store, config: Config, doc: dict[str, Any],
                  lines: list[str]) -> DrillReport:
    await store_report(store, config.log_id, doc)
    return DrillReport(doc, lines)


async def _segment_time(store: Store, log_id: str, seq: int) -> int | None:
    data = await DeltaLog(store, log_id).fetch(seq) if seq > 0 else None
    return None if data is None else parse_header(data)[0].created_at_ms


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class PruneResult:
    first_seq: int | None
    head_seq: int | None
    keep_from: int | None
    deleted: list[int] = field(default_factory=list)
    kept_reason: str = ""
    locked: list[int] = field(default_factory=list)


async def prune(config: Config, store: Store, older_than_s: float, *,
                dry_run: bool = False) -> PruneResult:
    """Delete the oldest segments written before now - older_than_s, as a prefix only
    (the log stays contiguous), never the head (it holds the newest position map), never
    one a sink has not applied yet (nor the one it applied last: apply re-reads it to
    check the chain on restart), never one still under Object Lock retention."""
    from daemon.ops import peek_checkpoints

    log_ = DeltaLog(store, config.log_id)
    first, head = await log_.first_seq(), await log_.head_seq()
    result = PruneResult(first, head, None)
    if first is None or head is None:
        result.kept_reason = "log is empty"
        return result
    keep_from, why = head, "the head holds the newest positions"
    for name, cp in (await peek_checkpoints(config)).items():
        if max(cp.seq, 1) < keep_from:
            keep_from, why = max(cp.seq, 1), f"{name} has applied through seq {cp.seq}"
    result.keep_from = keep_from
    cutoff_ms = _now_ms() - older_than_s * 1000
    lock_days = config.connectors.store_type(config.store).retain_days(config.store)
    for seq in range(first, keep_from):
        data = await log_.fetch(seq)
        created = parse_header(data)[0].created_at_ms if data else None
        if created is None or created >= cutoff_ms:
            why = f"seq {seq} is newer than the cutoff"
            break
        if lock_days is not None and created + lock_days * 86_400_000 > _now_ms():
            result.locked.append(seq)
            why = f"seq {seq} is under Object Lock retention ({lock_days} days)"
            break
        if not dry_run:
            await store.delete(log_.key(seq))
        result.deleted.append(seq)
    result.kept_reason = why
    log.info("prune_done", log_id=config.log_id, deleted=len(result.deleted), reason=why)
    return result

