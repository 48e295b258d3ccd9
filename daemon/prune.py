"""`prune`: delete the oldest segments that no reader still needs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from drstream.daemon.config import Config
from drstream.daemon.deltalog import DeltaLog
from drstream.daemon.logging import get_logger
from drstream.daemon.segment import parse_header
from drstream.daemon.status import peek_checkpoints
from drstream.daemon.store import Store

log = get_logger("drstream.prune")


@dataclass
class PruneResult:
    first_seq: int | None
    head_seq: int | None
    keep_from: int | None
    deleted: list[int] = field(default_factory=list)
    kept_reason: str = ""
    locked: list[int] = field(default_factory=list)


async def prune(config: Config, store: Store, older_than_s: float, *,
                dry_run: bool = False) -> PruneResult:
    """Delete the oldest segments written before now - older_than_s, as a prefix only
    (the log stays contiguous), never the head (it holds the newest position map), never
    one a sink of `config` has not applied yet (nor the one it applied last: apply re-reads
    it to check the chain on restart), never one still under Object Lock retention.
    A config without sinks protects no apply: the command line refuses one unless told
    to prune by age alone."""
    log_ = DeltaLog(store, config.log_id)
    first, head = await log_.first_seq(), await log_.head_seq()
    result = PruneResult(first, head, None)
    if first is None or head is None:
        result.kept_reason = "log is empty"
        return result
    keep_from, why = head, "the head holds the newest positions"
    for name, cp in (await peek_checkpoints(config)).items():
        if max(cp.seq, 1) < keep_from:
            keep_from, why = max(cp.seq, 1), f"{name} has applied through seq {cp.seq}"
    result.keep_from = keep_from
    cutoff_ms = _now_ms() - older_than_s * 1000
    lock_days = config.connectors.store_type(config.store).retain_days(config.store)
    for seq in range(first, keep_from):
        data = await log_.fetch(seq)
        created = parse_header(data)[0].created_at_ms if data else None
        if created is None or created >= cutoff_ms:
            why = f"seq {seq} is newer than the cutoff"
            break
        if lock_days is not None and created + lock_days * 86_400_000 > _now_ms():
            result.locked.append(seq)
            why = f"seq {seq} is under Object Lock retention ({lock_days} days)"
            break
        if not dry_run:
            await store.delete(log_.key(seq))
        result.deleted.append(seq)
    result.kept_reason = why
    counted = {"would_delete" if dry_run else "deleted": len(result.deleted)}
    log.info("prune_done", log_id=config.log_id, dry_run=dry_run, reason=why, **counted)
    return result


def _now_ms() -> int:
    return int(time.time() * 1000)
