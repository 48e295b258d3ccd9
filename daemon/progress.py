"""The checkpoint of a sink that writes a segment's changes one at a time (a registry, an
object store): the applied seq and digest and, while a segment is half applied, how many
of its changes are done (`partial`), as one JSON document. Written after each change, it
lets a restart redo at most the one change that was in flight; each change is idempotent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from drstream.daemon.errors import DrstreamError, SinkError
from drstream.daemon.logging import get_logger
from drstream.daemon.records import Checkpoint

log = get_logger("drstream.progress")
T = TypeVar("T")

CHECKPOINT_VERSION = 1
# Segments without changes for a sink move its checkpoint in memory; it is stored at most
# this often (and at close), sparing a registry call or a PUT per idle segment.
IDLE_CHECKPOINT_INTERVAL_S = 10.0

WriteCheckpoint = Callable[[Checkpoint, "dict[str, Any] | None"], Awaitable[None]]


def encode_checkpoint(cp: Checkpoint, partial: dict[str, Any] | None = None) -> str:
    doc: dict[str, Any] = {
        "v": CHECKPOINT_VERSION, "seq": cp.seq, "digest": cp.digest.hex(),
        "created_at_ms": cp.created_at_ms, "max_record_ms": cp.max_record_ms,
        "positions": cp.positions}
    if partial is not None:
        doc["partial"] = partial
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def decode_checkpoint(raw: str | bytes, where: str) -> tuple[Checkpoint, dict[str, Any] | None]:
    """(checkpoint, partial); SinkError naming `where` when it cannot be read."""
    try:
        doc = json.loads(raw)
        cp = Checkpoint(seq=int(doc["seq"]), digest=bytes.fromhex(doc["digest"]),
                        created_at_ms=int(doc["created_at_ms"]),
                        max_record_ms=doc.get("max_record_ms"),
                        positions=dict(doc.get("positions") or {}))
        partial = doc.get("partial")
        if partial is not None:
            partial = {"seq": int(partial["seq"]), "digest": str(partial["digest"]),
                       "done": int(partial["done"])}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SinkError(f"{where}: unreadable checkpoint: {e}") from e
    return cp, partial


def partial_after(seq: int, digest: bytes, done: int) -> dict[str, Any]:
    """The `partial` of a segment with `done` changes applied."""
    return {"seq": seq, "digest": digest.hex(), "done": done}


def changes_done(partial: dict[str, Any] | None, seq: int, digest: bytes, sink: str) -> int:
    """How many changes of segment `seq` a restart finds applied (0 unless `partial` is
    about this segment); SinkError when the log now holds another segment `seq`."""
    if partial is None or partial["seq"] != seq:
        return 0
    if partial["digest"] != digest.hex():
        raise SinkError(f"{sink}: segment {seq} differs from the one partly applied before "
                        "a restart (log rewritten?)")
    return int(partial["done"])


async def apply_in_turn(changes: Sequence[T], seq: int, digest: bytes, done: int,
                        apply_one: Callable[[T], Awaitable[None]],
                        write_partial: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    """Apply `changes[done:]` in order, writing the progress after each but the last (the
    caller's checkpoint of the whole segment follows it)."""
    for i in range(done, len(changes)):
        await apply_one(changes[i])
        if i + 1 < len(changes):
            await write_partial(partial_after(seq, digest, i + 1))


class SinkProgress:
    """Where a sink that writes a segment's changes one at a time stands: the checkpoint
    applied (`cp`), the partial its start found, and when `write` last stored a whole
    checkpoint on the standby."""

    def __init__(self, sink: str, write: WriteCheckpoint) -> None:
        self.sink = sink
        self._write = write
        self.cp = Checkpoint()
        self.partial: dict[str, Any] | None = None
        self._stored_seq = 0
        self._stored_at = 0.0

    def resume(self, cp: Checkpoint, partial: dict[str, Any] | None) -> None:
        """Go on from the checkpoint (and partial) read from the standby at start."""
        self.cp, self.partial = cp, partial
        self._stored(cp)

    def _stored(self, cp: Checkpoint) -> None:
        self._stored_seq, self._stored_at = cp.seq, time.monotonic()

    async def apply(self, changes: Sequence[T], seq: int, digest: bytes, cp: Checkpoint,
                    apply_one: Callable[[T], Awaitable[None]], *, unit: str) -> None:
        """Apply segment `seq`'s changes (`unit`: what the log calls them) after those a
        restart finds done, then move to `cp`: stored at once after changes, else at most
        every IDLE_CHECKPOINT_INTERVAL_S."""
        done = changes_done(self.partial, seq, digest, self.sink)
        if done:
            log.info("segment_resumed", sink=self.sink, seq=seq,
                     **{f"{unit}_done": done, unit: len(changes)})
        await apply_in_turn(changes, seq, digest, done, apply_one,
                            lambda partial: self._write(self.cp, partial))
        self.partial = None
        if changes or time.monotonic() - self._stored_at >= IDLE_CHECKPOINT_INTERVAL_S:
            await self._write(cp, None)
            self._stored(cp)
        self.cp = cp
        if changes:
            log.info("segment_applied", sink=self.sink, seq=seq, **{unit: len(changes)})

    async def flush(self, write: WriteCheckpoint | None = None) -> None:
        """At close: store the checkpoint if idle segments moved it. A failure is only
        logged: a restart then reads those segments again, and they change nothing."""
        if self.cp.seq <= self._stored_seq:
            return
        try:
            await (write or self._write)(self.cp, None)
        except DrstreamError as e:
            log.warning("checkpoint_not_written_at_close", sink=self.sink, error=str(e))
            return
        self._stored(self.cp)
