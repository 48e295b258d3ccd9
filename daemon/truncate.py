"""`drstream log truncate`: the operator's explicit, audited removal of a log's tail.

The writer never removes more than its own crash can leave (daemon.deltalog); when it
stops on a damaged or foreign tail, or a gap, this command removes every segment after a
seq the operator names, so that `ship` resumes after it (re-reading the source from the
positions there). It refuses when any of those segments is under Object Lock retention,
or when a configured sink has already applied past the seq (the standby would be ahead
of the log), and it stores an audit record naming every removed object and its SHA-256
before it removes anything. Removal purges every stored version, so a versioned store
keeps no hidden copy that a later writer would have to refuse.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from drstream.daemon.audit import ActionReport
from drstream.daemon.config import Config
from drstream.daemon.deltalog import DeltaLog
from drstream.daemon.errors import DrstreamError
from drstream.daemon.layout import segments_prefix, seq_from_key
from drstream.daemon.logging import get_logger
from drstream.daemon.segment import MAX_SEGMENT_SIZE
from drstream.daemon.status import peek_checkpoints
from drstream.daemon.store import Store

log = get_logger("drstream.truncate")


@dataclass
class TruncateResult(ActionReport):
    """Each segment removed (or, on a dry run, to be removed) with its size and SHA-256;
    `hidden` when only a delete marker stood for it."""

    action: ClassVar[str] = "log-truncate"
    after_seq: int
    removed: list[dict[str, Any]] = field(default_factory=list)  # seq, key, sha256, size

    def body(self) -> dict[str, Any]:
        return {"after_seq": self.after_seq, "removed": self.removed}


async def truncate(config: Config, store: Store, after_seq: int, *, dry_run: bool = False,
                   reason: str = "") -> TruncateResult:
    """Remove every segment of the log after `after_seq` (stored or hidden), newest first."""
    log_ = DeltaLog(store, config.log_id)
    result = TruncateResult(config.log_id, after_seq)
    seqs = await _seqs_after(log_, after_seq)
    for name, cp in (await peek_checkpoints(config)).items():
        if cp.seq > after_seq:
            raise DrstreamError(
                f"log {config.log_id}: sink {name} has applied through seq {cp.seq}, past "
                f"{after_seq}: truncating would leave the standby ahead of the log; fail "
                "over or re-seed the standby first")
    locked = []
    for seq in seqs:
        key = log_.key(seq)
        info = await store.head(key)
        data = await store.get(key, max_bytes=MAX_SEGMENT_SIZE) if info is not None else None
        if info is not None and info.retain_until_ms is not None and \
                info.retain_until_ms > time.time() * 1000:
            locked.append(key)
        result.removed.append({"seq": seq, "key": key, "size": None if data is None
                               else len(data), "sha256": None if data is None
                               else hashlib.sha256(data).hexdigest(), "hidden": data is None})
    if locked:
        raise DrstreamError(f"log {config.log_id}: {len(locked)} segments after seq "
                            f"{after_seq} are under Object Lock retention and cannot be "
                            f"removed: {', '.join(locked[:5])}; nothing was changed")
    if dry_run or not seqs:
        return result
    await result.record(store, at_ms=int(time.time() * 1000), reason=reason)
    for seq in reversed(seqs):  # newest first: what remains never has a hole
        await store.purge(log_.key(seq))
        log.warning("segment_truncated", log_id=config.log_id, seq=seq, key=log_.key(seq),
                    audit=result.audit_object)
    return result


async def _seqs_after(log_: DeltaLog, after_seq: int) -> list[int]:
    """Seqs after `after_seq`, stored or hidden behind a delete marker."""
    start = log_.key(after_seq)
    seqs = {s async for k in log_.store.list(segments_prefix(log_.log_id), start_after=start)
            if (s := seq_from_key(k)) is not None}
    seqs |= {s async for k in log_.store.hidden(segments_prefix(log_.log_id), start_after=start)
             if (s := seq_from_key(k)) is not None}
    return sorted(seqs)
