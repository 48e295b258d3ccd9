"""The MLflow sink's checkpoint: a JSON tag on a registered model of the standby itself
(`drstream.checkpoint.<log_id>.<sink name>`), so the standby carries its own position.

Beside the applied seq and digest it holds, while a segment is half applied, how many of
its events are done (`partial`): a restart re-runs at most the one event in flight.
"""

from __future__ import annotations

import json
from typing import Any

from drstream.daemon.errors import SinkError
from drstream.daemon.records import Checkpoint

CHECKPOINT_TAG = "drstream.checkpoint"
# The apply that started last owns the checkpoint model; an older one that finds another
# owner there stops before its next checkpoint (Kafka fences with transactions instead).
OWNER_TAG = "drstream.owner"
CHECKPOINT_VERSION = 1


def encode_checkpoint(cp: Checkpoint, partial: dict[str, Any] | None = None) -> str:
    doc: dict[str, Any] = {
        "v": CHECKPOINT_VERSION, "seq": cp.seq, "digest": cp.digest.hex(),
        "created_at_ms": cp.created_at_ms, "max_record_ms": cp.max_record_ms,
        "positions": cp.positions}
    if partial is not None:
        doc["partial"] = partial
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def decode_checkpoint(raw: str, where: str) -> tuple[Checkpoint, dict[str, Any] | None]:
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
        raise SinkError(f"{where}: unreadable checkpoint tag {CHECKPOINT_TAG!r}: {e}") from e
    return cp, partial
