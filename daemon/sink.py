"""The Sink interface (what `apply` writes to).

A sink owns its checkpoint because exactly-once needs the checkpoint written atomically
with the data (for Kafka: in the same transaction). `apply` hands every segment in order;
the sink skips what its checkpoint says is already applied.
"""

from __future__ import annotations

from typing import Any, Protocol

from drstream.daemon.records import Body, Checkpoint


class Sink(Protocol):
    name: str

    async def start(self) -> Checkpoint:
        """Connect, fence older instances, and return the last committed checkpoint
        (idempotent: a second call returns the checkpoint held)."""
        ...

    async def apply(self, seq: int, digest: bytes, created_at_ms: int, body: Body) -> None:
        """Write the segment's changes and its checkpoint atomically."""
        ...

    # Optional: `async def apply_batch(self, segments: list[AppliedSegment]) -> None` writes
    # several consecutive segments and the last one's checkpoint atomically (one Kafka
    # transaction); the applier uses it when a sink defines it and segments are waiting.
    #
    # Optional: `produce_form: tuple[tuple[Header, ...], str | None]`: the sink writes
    # Kafka records through produce() and takes them as its arguments (ProduceBatch):
    # the headers every record ends with and the source-offset header's name. For a
    # lone such sink apply decodes segments straight into that form (no record objects)
    # on a worker thread, overlapping with the sink writing the group before.

    def checkpoint(self) -> Checkpoint: ...

    async def peek(self) -> Checkpoint:
        """Read the committed checkpoint without fencing a running apply (status)."""
        ...

    async def sync_groups(self, force: bool = False) -> dict[str, Any]:
        """Translate the group offsets applied so far and commit those that changed on
        groups with no active members; returns what was committed. `force` commits every
        group again, not only those that changed (failover's final sync)."""
        ...

    async def close(self) -> None:
        """Release connections and threads (idempotent; daemon.lifecycle)."""
        ...

    async def __aenter__(self) -> Sink: ...

    async def __aexit__(self, *exc: object) -> None: ...
