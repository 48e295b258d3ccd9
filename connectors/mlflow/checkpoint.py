"""The MLflow sink's checkpoint: a JSON tag on a registered model of the standby itself
(`drstream.checkpoint.<log_id>.<sink name>`), so the standby carries its own position.

Beside the applied seq and digest it holds, while a segment is half applied, how many of
its events are done (`partial`): a restart re-runs at most the one event in flight.
"""

from __future__ import annotations

from drstream.daemon.progress import decode_checkpoint, encode_checkpoint

CHECKPOINT_TAG = "drstream.checkpoint"
# The apply that started last owns the checkpoint model; an older one that finds another
# owner there stops before its next checkpoint (Kafka fences with transactions instead).
OWNER_TAG = "drstream.owner"

__all__ = ["CHECKPOINT_TAG", "OWNER_TAG", "decode_checkpoint", "encode_checkpoint"]
