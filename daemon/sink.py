"""The Sink interface (what `apply` writes to).

A sink owns its checkpoint because exactly-once needs the checkpoint written atomically
with the data (for Kafka: in the same transaction). `apply` hands every segment in order;
the sink skips what its checkpoint says is already applied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from drstream.daemon.errors import DrstreamError
from drstream.daemon.records import AppliedSegment, Body, Checkpoint, Header, SealedSegment

# apply's opener of sealed segments, for a sink that opens them on its own thread: checks
# each chain link and MAC, decrypts, decodes each Kafka batch as produce() arguments with
# (tail headers, source-offset header name), and applies replay's filter. Returns the
# segments opened, in order, and the error that stopped it at the next one (or None).
Opener = Callable[[list[SealedSegment], tuple[Header, ...], str | None],
                  tuple[list[AppliedSegment], DrstreamError | None]]


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
    # Optional: `async def apply_sealed(self, segments: list[SealedSegment], open: Opener)
    # -> list[AppliedSegment]` opens the segments with `open` on the sink's own thread and
    # writes those it opened like apply_batch, then raises the opener's error if it had
    # one; returns what it applied. The applier uses it for a lone sink: one thread hop
    # per group of segments instead of a decode hop plus a write hop each.

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
