"""`drstream shards change`: hand a log set over to a new shard count (docs/shards.md).

The old ship shards are stopped. Each old log gets a last segment, its seal: no records,
the head's positions, and `extra["drstream.sealed"]` naming the new count; a ship never
writes after a seal (it refuses to start on a sealed log, and one still running is fenced
by the seal's seq). Each new log starts with a handover segment: no records, the union of
the old heads' positions restricted to the partitions the new shard owns, and
`extra["drstream.handover"]` naming every old log and its seal seq. A new ship resumes at
those positions as after any restart; a new apply applies nothing past the handover until
every old log's apply has applied its seal (so a partition is never written out of order),
and takes over the old applies' offset maps for its partitions (group translation stays
exact). Replays walk from the old logs into the new ones (`predecessors`).

Running it again after an interruption finishes the job: a sealed old log keeps its seal,
a new log whose handover is written is left as it is.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, ClassVar

from drstream.daemon.audit import ActionReport
from drstream.daemon.codec import Body, make_manifest
from drstream.daemon.config import Config
from drstream.daemon.deltalog import DeltaLog, LogWriter
from drstream.daemon.errors import ConfigError, ConfigFieldError, DrstreamError, StoreError
from drstream.daemon.keyring import KeyRing
from drstream.daemon.logging import get_logger
from drstream.daemon.records import Manifest
from drstream.daemon.segment import read_manifest, segment_digest
from drstream.daemon.shards import HANDOVER, SEALED, shard_log_id, shard_of
from drstream.daemon.store import Store

log = get_logger("drstream.reshard")


@dataclass
class ChangeReport(ActionReport):
    """The seal seq of each old log and the partitions each new log starts with."""

    action: ClassVar[str] = "shards-change"
    old_count: int
    new_count: int
    sealed: dict[str, int] = field(default_factory=dict)  # old log -> seal seq
    started: dict[str, list[str]] = field(default_factory=dict)  # new log -> partitions

    def body(self) -> dict[str, Any]:
        return {"from": self.old_count, "to": self.new_count, "sealed": self.sealed,
                "started": self.started}


def _check(config: Config, to: int) -> list[str]:
    """The streams split by partition; refuses what a change cannot carry over."""
    if to == config.shards.count:
        raise ConfigFieldError("--to", to, f"the set already has {to} shards")
    if not config.sources:
        raise ConfigError("config", [ConfigFieldError(
            "sources", [], "shards change reads the old heads' positions per stream: use "
            "the ship (primary) config")])
    unsharded = [s.stream for s in config.sources
                 if not config.connectors.source_type(s).sharded]
    if unsharded:  # a registry's state lives in its log's blobs (blobs/<log_id>/)
        raise ConfigFieldError("sources", unsharded, "a count change carries over only "
                               "partitioned streams (Kafka); these keep state in shard 0's "
                               "log and need a new set")
    return [s.stream for s in config.sources if s.stream is not None]


async def _head_manifest(store: Store, keyring: KeyRing, log_id: str
                         ) -> tuple[int, bytes, Manifest] | None:
    log_ = DeltaLog(store, log_id, keyring)
    head = (await log_.end()).head
    if head is None:
        return None
    data = await log_.fetch(head)
    if data is None:
        raise StoreError(f"log {log_id}: head segment {head} vanished while reading it")
    _, manifest = await asyncio.to_thread(read_manifest, data, keyring, expect_log_id=log_id,
                                          expect_seq=head)
    return head, data, manifest


async def _seal(store: Store, keyring: KeyRing, log_id: str, to: int) -> tuple[int, Manifest]:
    """The old log's seal seq and the positions it ends at (sealed now, or before)."""
    found = await _head_manifest(store, keyring, log_id)
    if found is None:
        raise DrstreamError(f"log {log_id} has no segment: nothing to hand over (start "
                            "every old ship shard once, or make a new set)")
    head, _, manifest = found
    if SEALED in manifest.extra:
        return head, manifest
    writer = LogWriter(store, log_id, keyring, max_in_flight=1)
    try:
        manifest = await writer.open() or manifest
        body = Body(make_manifest(manifest.positions, [], extra={SEALED: {"count": to}}))
        seq = await writer.append(body)
        await writer.flush()
    except StoreError as e:  # FencedError: its ship wrote that seq meanwhile
        raise DrstreamError(f"log {log_id}: cannot seal it ({e}); stop every ship shard of "
                            "the old set first, then run the command again") from e
    finally:
        await writer.close()
    log.info("log_sealed", log_id=log_id, seq=seq, count=to)
    return seq, manifest


def _owned(positions: dict[str, Any], streams: list[str], index: int, count: int
           ) -> dict[str, Any]:
    return {stream: {t: {p: o for p, o in parts.items() if shard_of(t, int(p), count) == index}
                     for t, parts in positions.get(stream, {}).items()}
            for stream in streams}


async def _start_log(store: Store, keyring: KeyRing, log_id: str, positions: dict[str, Any],
                     handover: dict[str, Any]) -> None:
    found = await _head_manifest(store, keyring, log_id)
    if found is not None:
        _, _, manifest = found
        if manifest.extra.get(HANDOVER) == handover:
            return  # written by an earlier run of this change
        raise DrstreamError(f"log {log_id} exists and was not started by this change: a set "
                            "of this count was used before; give the set a new log_id")
    writer = LogWriter(store, log_id, keyring, max_in_flight=1)
    try:
        await writer.open()
        await writer.append(Body(make_manifest(positions, [], extra={HANDOVER: handover})))
        await writer.flush()
    finally:
        await writer.close()
    log.info("log_started", log_id=log_id, handover_from=[p["log_id"] for p in handover["from"]])


async def change_count(config: Config, store: Store, keyring: KeyRing, to: int
                       ) -> ChangeReport:
    streams = _check(config, to)
    old = config.shards.count
    report = ChangeReport(config.log_id, old, to)
    union: dict[str, Any] = {s: {} for s in streams}
    sources = []
    for k in range(old):
        old_id = shard_log_id(config.log_id, k, old)
        seq, manifest = await _seal(store, keyring, old_id, to)
        data = await DeltaLog(store, old_id, keyring).fetch(seq)
        assert data is not None  # just read or written
        sources.append({"log_id": old_id, "seq": seq, "digest": segment_digest(data).hex()})
        report.sealed[old_id] = seq
        for stream in streams:
            for topic, parts in manifest.positions.get(stream, {}).items():
                union[stream].setdefault(topic, {}).update(parts)
    handover = {"count": to, "from": sources}
    for j in range(to):
        new_id = shard_log_id(config.log_id, j, to)
        positions = _owned(union, streams, j, to)
        await _start_log(store, keyring, new_id, positions, handover)
        report.started[new_id] = sorted(f"{t}[{p}]" for s in streams
                                        for t, parts in positions[s].items() for p in parts)
    await report.record(store)
    return report


async def predecessors(store: Store, keyring: KeyRing, log_id: str) -> list[str]:
    """The logs a log was handed over from (its first segment's handover), oldest
    generation first, each once: a replay walks them before the log itself."""
    out: list[str] = []
    pending = [log_id]
    while pending:
        current = pending.pop()
        data = await DeltaLog(store, current, keyring).fetch(1)
        if data is None:
            continue
        _, manifest = await asyncio.to_thread(read_manifest, data, keyring,
                                              expect_log_id=current, expect_seq=1)
        for pred in manifest.extra.get(HANDOVER, {}).get("from", []):
            if pred["log_id"] not in out:
                out.insert(0, pred["log_id"])
                pending.append(pred["log_id"])
    return out
