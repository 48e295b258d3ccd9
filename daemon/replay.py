"""`replay`: rebuild one stream of the log into a target, up to a time or through a seq.

Replay is apply with a filter and a different sink: the changes of one stream up to a
time or through a seq, written to a target of the replay's own choosing under its own
checkpoint (so an interrupted replay resumes with no duplicates). What "a change", "up to
a time" and "the target" mean belongs to the stream's kind: the connector whose source
wrote the stream (daemon.plugins.StreamKind) supplies the filter and the target sink.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from drstream.daemon.applier import Applier
from drstream.daemon.blobs import BlobStore
from drstream.daemon.codec import Body
from drstream.daemon.config import Config
from drstream.daemon.deltalog import DeltaLog
from drstream.daemon.errors import ConfigFieldError, DrstreamError
from drstream.daemon.keyring import KeyRing
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
    log_ = DeltaLog(store, log_id)
    first = await log_.first_seq()
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
