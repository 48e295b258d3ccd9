"""`replay`: rebuild one stream of the log into a target, up to a time or through a seq.

Replay is apply with a filter and a different sink: the changes of one stream up to a
time or through a seq, written to a target of the replay's own choosing under its own
checkpoint (so an interrupted replay resumes with no duplicates). What "a change", "up to
a time" and "the target" mean belongs to the stream's kind: the connector whose source
wrote the stream (daemon.plugins.StreamKind) supplies the filter and the target sink.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from drstream.daemon.applier import Applier
from drstream.daemon.blobs import BlobStore
from drstream.daemon.codec import Body
from drstream.daemon.config import Config
from drstream.daemon.deltalog import DeltaLog
from drstream.daemon.errors import ConfigFieldError, DrstreamError
from drstream.daemon.keyring import KeyRing
from drstream.daemon.layout import (
    SEGMENT_SUFFIX,
    replay_pin_key,
    replay_pins_prefix,
    seq_from_key,
)
from drstream.daemon.lifecycle import Closing
from drstream.daemon.plan import ReplayPlan
from drstream.daemon.plugins import ConnectorConfig, StreamFilter
from drstream.daemon.records import Checkpoint
from drstream.daemon.segment import read_manifest
from drstream.daemon.store import Store

REPLAY_POLL_MAX_S = 0.2  # a replay reads a log that is already there: probe often


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
    log_ = DeltaLog(store, log_id, keyring)
    first = await log_.log_start()
    if first is None or first == 1:
        return None
    data = await log_.fetch(first)
    if data is None:
        raise DrstreamError(f"replay: segment {first} of log {log_id} vanished while starting")
    _, manifest = read_manifest(data, keyring, expect_log_id=log_id, expect_seq=first)
    return first, manifest.positions.get(stream, {})


async def streams_of(store: Store, keyring: KeyRing, log_id: str) -> list[str]:
    """The streams the log holds: those of its oldest and of its newest segment's
    position maps (every manifest names every stream its shipper tracked). Empty when
    the log has no segment."""
    log_ = DeltaLog(store, log_id)
    seqs = {await log_.first_seq(), await log_.head_seq()} - {None}
    found: set[str] = set()
    for seq in seqs:
        assert seq is not None
        data = await log_.fetch(seq)
        if data is not None:
            _, manifest = await asyncio.to_thread(read_manifest, data, keyring,
                                                  expect_log_id=log_id, expect_seq=seq)
            found.update(manifest.positions)
    return sorted(found)


async def check_log(store: Store, keyring: KeyRing, log_id: str, log_option: str,
                    stream: str | None = None) -> None:
    """Refuse, before anything is replayed, a log that has no segment (a mistyped log id
    or store) or that does not hold `stream` (a mistyped --stream): ConfigFieldError
    naming the option."""
    streams = await streams_of(store, keyring, log_id)
    if not streams:
        raise ConfigFieldError(log_option, log_id, f"no segments of this log in {store.url}")
    if stream is not None and stream not in streams:
        raise ConfigFieldError("--stream", stream, f"log {log_id} holds no such stream "
                               f"(streams: {', '.join(streams)})")


async def replay(config: Config, store: Store, keyring: KeyRing, plan: ReplayPlan,
                 progress: Progress | None = None,
                 on_filter: Callable[[StreamFilter], None] | None = None,
                 pin: bool = False) -> ReplayResult:
    """Replay the plan's stream into the target its options name (a dry run counts only).
    `on_filter` sees the filter before anything is written (a drill cleans up after it).
    `pin`: until it completes, the named replay pins the segments it still needs in the
    store (replays/), so `prune` keeps them and an interrupted replay can resume."""
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
    log_ = DeltaLog(store, config.log_id, keyring)
    head = (await log_.end()).head  # a gap in the log: LogGapError naming the missing seqs
    end = min(head or 0, plan.until_seq) if plan.until_seq is not None else (head or 0)
    started = time.monotonic()
    reporter = asyncio.create_task(_report(applier, filt, end, started, progress))
    try:
        pinned = await _pin(store, log_, plan, applier) if pin and end > 0 else None
        last = await applier.run(asyncio.Event(), until_seq=end, known_end=head) \
            if end > 0 else 0
        if pinned is not None:  # done: what it needed may go
            await unpin(store, config.log_id, plan.name)
    finally:
        reporter.cancel()
        await applier.close()
    elapsed = time.monotonic() - started
    if progress is not None:
        progress(last, end, filt.count, filt.bytes, elapsed)
    return ReplayResult(last, end, filt.count, filt.bytes, elapsed, filt, applier)


def _pin_name(name: str) -> str:
    """A replay name as one key segment ('/', '.' and the rest percent-encoded)."""
    return quote(name, safe="-_").replace(".", "%2E") or "%00"


async def _pin(store: Store, log_: DeltaLog, plan: ReplayPlan, applier: Applier) -> str:
    """Record what this named replay still needs: from its checkpoint (or the oldest
    segment, which a fresh replay of a pruned log seeds from) on. The new pin is stored
    before the older ones of the same name go, so the segments are never unpinned."""
    after = await applier.start()
    keep_from = max(after, await log_.log_start() or 1)
    name = _pin_name(plan.name)
    key = replay_pin_key(log_.log_id, name, keep_from)
    doc = {"replay": plan.name, "log_id": log_.log_id, "stream": plan.stream,
           "keep_from_seq": keep_from, "pinned_at_ms": int(time.time() * 1000)}
    await store.put_if_absent(key, json.dumps(doc).encode())
    async for old in store.list(replay_pins_prefix(log_.log_id, name)):
        if old != key:
            await store.delete(old)
    return key


async def unpin(store: Store, log_id: str, name: str) -> None:
    async for key in store.list(replay_pins_prefix(log_id, _pin_name(name))):
        await store.delete(key)


async def replay_pins(store: Store, log_id: str) -> dict[str, int]:
    """Named replays that are not finished: name -> the oldest seq they still need."""
    pins: dict[str, int] = {}
    async for key in store.list(replay_pins_prefix(log_id)):
        name, _, leaf = key[len(replay_pins_prefix(log_id)):].partition("/")
        seq = seq_from_key(leaf.replace(".json", SEGMENT_SUFFIX))
        if seq is not None:
            pins[unquote(name)] = min(seq, pins.get(unquote(name), seq))
    return pins


async def _report(applier: Applier, filt: StreamFilter, end: int, started: float,
                  progress: Progress | None) -> None:
    while progress is not None:
        await asyncio.sleep(1.0)
        progress(applier.progress.applied_seq, end, filt.count, filt.bytes,
                 time.monotonic() - started)
