"""The Source interface (what `ship` reads from).

A source runs its client off the event loop and hands the pipeline `Delivery`s: records
grouped by partition (or registry events), plus the source's FULL position map right after
them. Its connector builds it from its config and the core's `Context` (daemon.plugins).
The pipeline writes that map into each segment's manifest, which is what makes the log
the shipper's checkpoint: segment durable => positions durable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from drstream.daemon.records import EventBatch, KafkaBatch, KafkaColumns


@dataclass
class Delivery:
    batches: Sequence[KafkaBatch | KafkaColumns]
    positions: dict[str, Any]  # this source's full position map after these records
    nbytes: int = 0  # buffered payload bytes; released with Source.release
    metadata: dict[str, Any] | None = None  # topic metadata that is new or changed
    group_offsets: dict[str, Any] = field(default_factory=dict)  # group -> topic -> p -> off
    events: list[EventBatch] = field(default_factory=list)  # registry change events, in order
    # offsets the source can never ship (deleted by retention before they were read):
    # topic -> partition -> [first, end); recorded in the log for auditors
    gaps: dict[str, dict[str, list[int]]] = field(default_factory=dict)


class Source(Protocol):
    stream: str  # stream name in manifests, e.g. "kafka:primary"

    async def start(self, positions: dict[str, Any] | None) -> None:
        """Connect and assign, resuming at `positions` (None: the configured start);
        idempotent."""
        ...

    async def read(self, timeout_s: float) -> Delivery | None:
        """The next delivery, or None if nothing arrived within `timeout_s`."""
        ...

    def positions(self) -> dict[str, Any]:
        """The full position map after the last delivery handed out."""
        ...

    def release(self, nbytes: int) -> None:
        """The pipeline has encoded `nbytes` of delivered payload: buffer space is free."""
        ...

    async def durable(self, positions: dict[str, Any]) -> None:
        """Positions are durable in the log (for visibility commits only)."""
        ...

    async def close(self) -> None:
        """Stop and release everything (idempotent; daemon.lifecycle)."""
        ...

    async def __aenter__(self) -> Source: ...

    async def __aexit__(self, *exc: object) -> None: ...

    def reconfigure(self, config: Any) -> None:
        """Take a reloaded config of the same source (selection, intervals)."""
        ...

    async def probe(self, positions: dict[str, Any]) -> SourceProbe:
        """Compare the live source with `positions` without joining or assigning anything."""
        ...


@dataclass
class SourceProbe:
    """What a source's live cluster says, next to what the log holds (status, failover)."""

    reachable: bool
    error: str | None = None
    pending_records: int = 0  # records on the source beyond the given positions
    oldest_pending_ms: int | None = None  # timestamp of the oldest record not in the log
    newest_record_ms: int | None = None  # newest record timestamp seen on the source
