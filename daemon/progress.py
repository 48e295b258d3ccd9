"""The checkpoint of a sink that writes a segment's changes one at a time (a registry, an
object store): the applied seq and digest and, while a segment is half applied, how many
of its changes are done (`partial`), as one JSON document. Written after each change, it
lets a restart redo at most the one change that was in flight; each change is idempotent.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from drstream.daemon.errors import SinkError
from drstream.daemon.records import Checkpoint

T = TypeVar("T")

CHECKPOINT_VERSION = 1


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
