"""`status` and `failover`: operator views and actions over a running pair.

Both read the log head and the sinks' checkpoints without disturbing a running ship or
apply (status never fences anything); failover deliberately takes over the apply role.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from drstream.daemon.applier import Applier
from drstream.daemon.audit import store_report
from drstream.daemon.blobs import BlobStore
from drstream.daemon.config import Config
from drstream.daemon.deltalog import DeltaLog
from drstream.daemon.errors import DrstreamError, SegmentError
from drstream.daemon.keyring import KeyRing
from drstream.daemon.logging import get_logger
from drstream.daemon.records import Checkpoint
from drstream.daemon.segment import read_manifest, segment_digest
from drstream.daemon.source import SourceProbe
from drstream.daemon.store import Store

log = get_logger("drstream.status")


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class LogHead:
    seq: int | None = None
    created_at_ms: int | None = None
    positions: dict[str, Any] = field(default_factory=dict)
    max_record_ms: int | None = None
    in_flight: list[int] = field(default_factory=list)  # stored after a hole: not durable


async def read_head(log: DeltaLog, keyring: KeyRing) -> LogHead:
    """The durable head and its manifest; a gap in the log raises LogGapError (the end of
    the log is never taken for a shorter log's head)."""
    tail = await DeltaLog(log.store, log.log_id, keyring).end()
    seq = tail.head
    if seq is None:
        return LogHead()
    data = await log.fetch(seq)
    if data is None:
        return LogHead(seq=seq, in_flight=list(tail.later))
    header, manifest = await asyncio.to_thread(
        read_manifest, data, keyring, expect_log_id=log.log_id, expect_seq=seq)
    return LogHead(seq=seq, created_at_ms=header.created_at_ms, positions=manifest.positions,
                   max_record_ms=manifest.max_timestamp_ms, in_flight=list(tail.later))


# A head older than this many heartbeat intervals: the shipper is not writing (stopped,
# cut off from the store) or the newest segments were removed.
STALE_HEARTBEATS = 3


async def unreadable(log: DeltaLog, seq: int, keyring: KeyRing) -> str | None:
    """Why segment `seq` cannot be authenticated (tampered bytes, a key this key ring does
    not hold, not a segment), naming it; None when it reads or is not stored (a gap is
    read_head's finding)."""
    data = await log.fetch(seq)
    if data is None:
        return None
    try:
        await asyncio.to_thread(read_manifest, data, keyring, expect_log_id=log.log_id,
                                expect_seq=seq)
    except SegmentError as e:
        return str(e)
    return None


async def log_findings(config: Config, log: DeltaLog, head: LogHead,
                       checkpoints: dict[str, Checkpoint], keyring: KeyRing | None = None
                       ) -> tuple[list[str], list[str]]:
    """(problems, warnings) of a log against its readers: a sink that applied past the head
    (the log was truncated), a segment other than the one it applied (rewritten), or a next
    segment it cannot read with `keyring` (damaged: its apply stops there; only that one is
    read, so a status costs one segment download per sink however far behind it is; verify,
    which reads every segment, passes none); a head older than STALE_HEARTBEATS heartbeat
    intervals (a stale log)."""
    problems, warnings = [], []
    for name, cp in checkpoints.items():
        end = head.seq
        if cp.seq and (end is None or cp.seq > end):
            # read again: the head was read before the checkpoints, and a running ship and
            # apply may both have moved on in between
            end = (await log.end()).head
        if cp.seq and (end is None or cp.seq > end):
            problems.append(f"truncated: sink {name} applied through seq {cp.seq} but the log "
                            f"ends at {end or 'nothing'}: segments were removed from "
                            "the end of the log")
        elif cp.seq and cp.digest:
            data = await log.fetch(cp.seq)
            if data is not None and segment_digest(data) != cp.digest:
                problems.append(f"rewritten: segment {cp.seq} ({log.key(cp.seq)}) is not the "
                                f"one sink {name} applied")
        if keyring is not None and end is not None and cp.seq < end:
            damaged = await unreadable(log, cp.seq + 1, keyring)
            if damaged:
                problems.append(f"damaged: {damaged}; sink {name} cannot apply past seq "
                                f"{cp.seq}")
    limit = STALE_HEARTBEATS * config.ship.heartbeat_interval_s
    if head.created_at_ms is not None and (now_ms() - head.created_at_ms) / 1000 > limit:
        age = (now_ms() - head.created_at_ms) / 1000
        warnings.append(f"stale log: the head (seq {head.seq}) was written {age:.0f}s ago, "
                        f"more than {STALE_HEARTBEATS} heartbeat intervals ({limit:g}s): ship "
                        "is not writing, or the newest segments were removed")
    return problems, warnings


async def probe_sources(config: Config, positions: dict[str, Any],
                        blobs: BlobStore | None = None) -> dict[str, SourceProbe]:
    out = {}
    for s in config.sources:
        src = config.connectors.source(s, config.context(blobs))
        out[src.stream] = await src.probe(positions.get(src.stream, {}))
    return out


@dataclass(frozen=True)
class Thresholds:
    """What `status` treats as a problem besides an unreachable source or sink (None: not
    checked): a stream's RPO and a sink's apply lag, in seconds."""

    max_rpo_s: float | None = None
    max_lag_s: float | None = None


@dataclass
class StatusReport:
    """`drstream status`: the log head, each stream's ship lag and RPO, each sink's apply
    lag, and the problems found (its JSON is `to_json()`, field for field)."""

    log_id: str
    store: str
    durable_head_seq: int | None
    head_written_at_ms: int | None
    head_age_s: float | None
    streams: dict[str, dict[str, Any]] = field(default_factory=dict)
    sinks: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # truncation, unreachable, thresholds
    warnings: list[str] = field(default_factory=list)  # a stale log
    in_flight_seqs: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}


@dataclass
class FailoverReport:
    """`drstream failover`: what was applied, the group offsets committed, each stream's
    RPO; stored under audit/ (`audit_object`)."""

    log_id: str
    at_ms: int
    durable_head_seq: int | None
    applied_seq: int
    newest_applied_record_ms: int | None
    sinks: dict[str, dict[str, Any]]
    groups_committed: dict[str, Any]
    streams: dict[str, dict[str, Any]]
    drain_s: float = 0.0
    audit_object: str = ""

    def to_json(self) -> dict[str, Any]:
        doc = {"action": "failover", **dataclasses.asdict(self)}
        if not self.audit_object:
            del doc["audit_object"]
        return doc


async def status(config: Config, store: Store, keyring: KeyRing,
                 thresholds: Thresholds = Thresholds()) -> StatusReport:
    """Per stream: ship lag and RPO estimate; per sink: applied seq and apply lag; the
    problems (an unreachable source or sink, a threshold passed, a truncated or
    rewritten log) and warnings (a stale log)."""
    blobs = BlobStore(store, config.log_id, keyring)
    log_ = DeltaLog(store, config.log_id, keyring)
    # Checkpoints before the head: apply only applies what is durable, so a head read
    # after them is never behind them (read the other way round, a heartbeat landing in
    # between showed a standby ahead of the log: a negative lag).
    checkpoints = await peek_each(config, blobs)
    head = await read_head(log_, keyring)
    now = now_ms()
    report = StatusReport(
        log_id=config.log_id, store=store.url, durable_head_seq=head.seq,
        head_written_at_ms=head.created_at_ms,
        head_age_s=None if head.created_at_ms is None else (now - head.created_at_ms) / 1000,
        in_flight_seqs=head.in_flight)
    for stream, probe in (await probe_sources(config, head.positions, blobs)).items():
        report.streams[stream] = _stream_status(probe, head, now)
    for name, cp in checkpoints.items():
        report.sinks[name] = _sink_status(cp, head)
    read = {n: cp for n, cp in checkpoints.items() if not isinstance(cp, DrstreamError)}
    report.problems, report.warnings = await log_findings(config, log_, head, read, keyring)
    report.problems += _problems(report, thresholds)
    return report


@dataclass
class SetStatus:
    """`drstream status` over a log set: each shard's report (by its log id) and the set's
    worst RPO and apply lag; a shard that could not be read is a problem of its own while
    the others are reported as usual."""

    log_id: str  # the set's (the config's) log_id
    shards: dict[str, StatusReport]  # "shard k/N" -> its report

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.shards.values())

    @property
    def failing(self) -> list[str]:
        return [label for label, r in self.shards.items() if not r.ok]

    def worst(self, section: str, key: str) -> float | None:
        """The largest known value of `key` over every stream or sink of every shard."""
        found = [v[key] for r in self.shards.values() for v in getattr(r, section).values()
                 if v.get(key) is not None]
        return max(found, default=None)

    def to_json(self) -> dict[str, Any]:
        return {"log_id": self.log_id, "ok": self.ok, "failing_shards": self.failing,
                "rpo_s": self.worst("streams", "rpo_s"),
                "apply_lag_s": self.worst("sinks", "apply_lag_s"),
                "shards": {label: r.to_json() for label, r in self.shards.items()}}


async def status_or_problem(config: Config, store: Store, keyring: KeyRing,
                            thresholds: Thresholds) -> StatusReport:
    """status(), or for a log that cannot be read (a gap, a damaged head) a report whose
    problem names the shard and the object: the other shards of a set still report."""
    try:
        return await status(config, store, keyring, thresholds)
    except DrstreamError as e:
        where = f"{config.shard.label} (log {config.log_id})" if config.shard else config.log_id
        return StatusReport(log_id=config.log_id, store=store.url, durable_head_seq=None,
                            head_written_at_ms=None, head_age_s=None,
                            problems=[f"{where}: {e}"])


def _sink_status(cp: Checkpoint | DrstreamError, head: LogHead) -> dict[str, Any]:
    if isinstance(cp, DrstreamError):
        return {"reachable": False, "error": str(cp)}
    return {
        "reachable": True,
        "applied_seq": cp.seq,
        "apply_lag_segments": None if head.seq is None else max(0, head.seq - cp.seq),
        "apply_lag_s": None if head.created_at_ms is None or not cp.created_at_ms
        else max(0.0, (head.created_at_ms - cp.created_at_ms) / 1000),
        "newest_applied_record_ms": cp.max_record_ms,
    }


def _problems(r: StatusReport, t: Thresholds) -> list[str]:
    out = []
    for stream, s in r.streams.items():
        if not s["reachable"]:
            out.append(f"{stream}: source unreachable ({s['error']})")
        rpo = s["rpo_s"] if s["reachable"] else s["rpo_s_upper_bound"]
        if t.max_rpo_s is not None and (rpo is None or rpo > t.max_rpo_s):
            shown = "unknown" if rpo is None else f"{rpo:.1f}s"
            out.append(f"{stream}: RPO {shown} is over --max-rpo {t.max_rpo_s:g}s")
    for sink, s in r.sinks.items():
        if not s["reachable"]:
            out.append(f"{sink}: sink unreachable ({s['error']})")
            continue
        lag = s["apply_lag_s"]
        if lag is None and r.durable_head_seq is not None and not s["applied_seq"]:
            lag = r.head_age_s  # nothing applied yet: behind since the log began at least
        if t.max_lag_s is not None and lag is not None and lag > t.max_lag_s:
            out.append(f"{sink}: apply lag {lag:.1f}s ({s['apply_lag_segments']} segments) "
                       f"is over --max-lag {t.max_lag_s:g}s")
    return out


async def peek_each(config: Config, blobs: BlobStore | None = None
                    ) -> dict[str, Checkpoint | DrstreamError]:
    """Each configured sink's committed checkpoint, read without fencing a running apply,
    or why it could not be read."""
    out: dict[str, Checkpoint | DrstreamError] = {}
    for s in config.sinks:
        async with config.connectors.sink(s, config.context(blobs)) as sink:
            try:
                out[sink.name] = await sink.peek()
            except DrstreamError as e:
                out[sink.name] = e
    return out


async def peek_checkpoints(config: Config,
                           blobs: BlobStore | None = None) -> dict[str, Checkpoint]:
    """Each configured sink's committed checkpoint; the first that cannot be read raises."""
    out = {}
    for name, cp in (await peek_each(config, blobs)).items():
        if isinstance(cp, DrstreamError):
            raise cp
        out[name] = cp
    return out


def _stream_status(probe: SourceProbe, head: LogHead, now: int) -> dict[str, Any]:
    if not probe.reachable:
        return {"reachable": False, "error": probe.error,
                "rpo_s_upper_bound": None if head.created_at_ms is None
                else (now - head.created_at_ms) / 1000}
    # A source that counts pending changes but cannot date them (a registry: tag and alias
    # changes carry no time) has an unknown RPO, never a reassuring 0.
    rpo: float | None = 0.0
    if probe.oldest_pending_ms is not None:
        rpo = (now - probe.oldest_pending_ms) / 1000
    elif probe.pending_records:
        rpo = None
    return {"reachable": True, "pending_records": probe.pending_records,
            "ship_lag_s": rpo, "rpo_s": rpo, "newest_record_ms": probe.newest_record_ms}


async def failover(config: Config, store: Store, keyring: KeyRing) -> FailoverReport:
    """Apply every durable segment, sync group offsets a last time, report the RPO."""
    log_ = DeltaLog(store, config.log_id)
    head = await read_head(log_, keyring)
    started = time.monotonic()
    async with Applier(config, store, keyring) as applier:
        applied = await applier.run(asyncio.Event(), until_seq=head.seq or 0,
                                    known_end=head.seq)
        groups = await applier.sync_groups_now()
        checkpoints = {s.name: s.checkpoint() for s in applier.sinks}
    probes = await probe_sources(config, head.positions, applier.blobs)
    report = _failover_report(config, head, applied, groups, checkpoints, probes)
    report.drain_s = round(time.monotonic() - started, 3)
    report.audit_object = (await store_report(store, config.log_id,
                                              report.to_json()))["audit_object"]
    log.info("failover_done", applied_seq=applied, audit=report.audit_object)
    return report


def _failover_report(config: Config, head: LogHead, applied: int, groups: dict[str, Any],
                     checkpoints: dict[str, Any], probes: dict[str, SourceProbe]
                     ) -> FailoverReport:
    newest_applied = max((cp.max_record_ms or 0 for cp in checkpoints.values()), default=0)
    streams: dict[str, Any] = {}
    for stream, probe in probes.items():
        if probe.reachable:
            newest = probe.newest_record_ms or 0
            streams[stream] = {
                "primary": "reachable", "records_not_replicated": probe.pending_records,
                "newest_primary_record_ms": probe.newest_record_ms,
                "rpo_s": max(0.0, (newest - newest_applied) / 1000) if newest else 0.0,
            }
        else:
            streams[stream] = {
                "primary": "unreachable", "error": probe.error,
                "last_heartbeat_ms": head.created_at_ms,
                "rpo_s_upper_bound": None if head.created_at_ms is None
                else max(0.0, (now_ms() - head.created_at_ms) / 1000),
            }
    return FailoverReport(
        log_id=config.log_id, at_ms=now_ms(), durable_head_seq=head.seq, applied_seq=applied,
        newest_applied_record_ms=newest_applied or None,
        sinks={name: {"applied_seq": cp.seq, "positions": cp.positions}
               for name, cp in checkpoints.items()},
        groups_committed=groups, streams=streams)

