"""`prune`: delete the oldest segments that no reader still needs, then the blobs that no
remaining segment names.

Segments go as a prefix only (the log stays contiguous): never the head (it holds the
newest position map), never one a sink has not applied yet (nor the one it applied last:
apply re-reads it to check the chain on restart), never one an unfinished named replay
still needs (its pin under replays/), never one whose Object Lock retain-until date (the
object's own, from a HEAD) has not passed. Only each segment's header is read (a ranged
GET). What was removed is stored as an audit record first, so `verify` can tell a prune
from segments deleted by anyone else.

Blobs are garbage-collected by mark and sweep: every blob a remaining segment names, and
every blob the oldest remaining segment's state needs to rebuild a pruned log (the
stream kind's seed), is marked; a blob marked by nothing is deleted only once it is older
than the grace period, so the blobs a running ship has just uploaded for a segment it has
not written yet stay. Marking decodes the remaining segments, and only runs when the log
has blobs at all (a Kafka-only log costs one LIST).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Final

from drstream.daemon.audit import store_report
from drstream.daemon.blobs import BlobStore
from drstream.daemon.config import Config
from drstream.daemon.deltalog import DeltaLog
from drstream.daemon.errors import LogGapError
from drstream.daemon.keyring import KeyRing
from drstream.daemon.layout import blobs_prefix, segments_prefix, seq_from_key
from drstream.daemon.logging import get_logger
from drstream.daemon.replay import replay_pins
from drstream.daemon.segment import MAX_HEADER_SIZE, decode_segment, parse_header
from drstream.daemon.status import peek_checkpoints
from drstream.daemon.store import Store
from drstream.daemon.verify import blob_refs

log = get_logger("drstream.prune")

DEFAULT_BLOB_GRACE_S: Final = 86_400.0  # a day: far longer than any version's upload


@dataclass
class BlobSweep:
    grace_s: float
    stored: int = 0
    needed: int = 0
    fresh: int = 0  # named by nothing yet, but younger than the grace period
    locked: int = 0
    deleted: list[str] = field(default_factory=list)


@dataclass
class PruneResult:
    first_seq: int | None
    head_seq: int | None
    keep_from: int | None
    deleted: list[int] = field(default_factory=list)
    kept_reason: str = ""
    locked: list[int] = field(default_factory=list)
    locked_until_ms: int | None = None
    replays: dict[str, int] = field(default_factory=dict)  # unfinished replay -> needs from
    blobs: BlobSweep | None = None
    audit_object: str = ""


async def prune(config: Config, store: Store, keyring: KeyRing, older_than_s: float, *,
                dry_run: bool = False, blob_grace_s: float = DEFAULT_BLOB_GRACE_S
                ) -> PruneResult:
    """Delete the oldest segments written before now - older_than_s that nothing needs,
    then the blobs nothing names (see the module doc). A config without sinks protects
    no apply: the command line refuses one unless told to prune by age alone."""
    log_ = DeltaLog(store, config.log_id, keyring)
    tail = await log_.end()  # a gap: LogGapError, nothing is deleted
    first, head = tail.first, tail.head
    result = PruneResult(first, head, None)
    if first is None or head is None:
        result.kept_reason = "log is empty"
        return result
    keep_from, why = head, "the head holds the newest positions"
    for name, cp in (await peek_checkpoints(config)).items():
        if max(cp.seq, 1) < keep_from:
            keep_from, why = max(cp.seq, 1), f"{name} has applied through seq {cp.seq}"
    result.replays = await replay_pins(store, config.log_id)
    for name, seq in result.replays.items():
        if seq < keep_from:
            keep_from, why = seq, f"replay {name!r} is unfinished and needs seq {seq} on"
    result.keep_from = keep_from
    why = await _plan(log_, result, first, keep_from, _now_ms() - older_than_s * 1000) or why
    new_first = result.deleted[-1] + 1 if result.deleted else first
    if new_first > first and await log_.written_before_any_durable(new_first):
        # A writer (or apply) would take such a first segment for a crash's leftovers
        # behind a lost seq 1 (DeltaLog.log_start), so keep the log's start.
        result.deleted.clear()
        why = f"seq {new_first} was written before seq 1 was durable"
    result.kept_reason = why
    if result.deleted and not dry_run:
        doc = await store_report(store, config.log_id, {
            "action": "prune", "log_id": config.log_id, "at_ms": _now_ms(),
            "deleted_from_seq": result.deleted[0], "deleted_through_seq": result.deleted[-1],
            "keys": [log_.key(result.deleted[0]), log_.key(result.deleted[-1])],
            "kept_reason": why})
        result.audit_object = doc["audit_object"]
        for seq in result.deleted:  # oldest first: what remains is always contiguous
            await store.delete(log_.key(seq))
    result.blobs = await sweep_blobs(config, log_, keyring, blob_grace_s, dry_run)
    counted = {"would_delete" if dry_run else "deleted": len(result.deleted)}
    log.info("prune_done", log_id=config.log_id, dry_run=dry_run, reason=why,
             blobs_deleted=len(result.blobs.deleted), **counted)
    return result


async def _plan(log_: DeltaLog, result: PruneResult, first: int, keep_from: int,
                cutoff_ms: float) -> str | None:
    """Fill result.deleted with the prefix that may go; the reason it stops, if earlier."""
    for seq in range(first, keep_from):
        found = await log_.store.get_prefix(log_.key(seq), MAX_HEADER_SIZE)
        if found is None:
            raise LogGapError(log_.log_id, [seq], f"seqs {first}..{keep_from} were stored "
                              "when prune began")
        header, _ = parse_header(found[0], expect_log_id=log_.log_id, expect_seq=seq,
                                 size=found[1])
        if header.created_at_ms >= cutoff_ms:
            return f"seq {seq} is newer than the cutoff"
        info = await log_.store.head(log_.key(seq))
        until = info.retain_until_ms if info is not None else None
        if until is not None and until > _now_ms():
            result.locked.append(seq)
            result.locked_until_ms = until
            return f"seq {seq} is under Object Lock retention until {until} (ms)"
        result.deleted.append(seq)
    return None


async def sweep_blobs(config: Config, log_: DeltaLog, keyring: KeyRing, grace_s: float,
                      dry_run: bool) -> BlobSweep:
    """Mark what the remaining log names, sweep the rest once older than `grace_s`."""
    sweep = BlobSweep(grace_s)
    store = log_.store
    stored = [key async for key in store.list(blobs_prefix(config.log_id))]
    sweep.stored = len(stored)
    if not stored:
        return sweep
    blobs = BlobStore(store, config.log_id, keyring)
    marked, last = await _mark(config, log_, blobs, None)
    unnamed = [k for k in stored if k.rsplit("/", 1)[-1] not in marked]
    if unnamed:  # segments written while marking may name some of them: mark those too
        marked |= (await _mark(config, log_, blobs, last))[0]
    now = _now_ms()
    for key in stored:
        if key.rsplit("/", 1)[-1] in marked:
            sweep.needed += 1
            continue
        info = await store.head(key)
        if info is None:
            continue
        if now - info.modified_ms < grace_s * 1000:
            sweep.fresh += 1
        elif info.retain_until_ms is not None and info.retain_until_ms > now:
            sweep.locked += 1
        else:
            sweep.deleted.append(key)
            if not dry_run:
                await store.delete(key)
    return sweep


async def _mark(config: Config, log_: DeltaLog, blobs: BlobStore, after: int | None
                ) -> tuple[set[str], int | None]:
    """Blob ids named by every stored segment after `after` (None: all of them, and the
    oldest one's seed state); and the last seq marked."""
    start = log_.key(after) if after is not None else None
    marked: set[str] = set()
    last, seeded = after, after is not None
    async for key in log_.store.list(segments_prefix(log_.log_id), start_after=start):
        seq = seq_from_key(key)
        data = await log_.fetch(seq) if seq is not None else None
        if seq is None or data is None:
            continue
        _, body = await asyncio.to_thread(decode_segment, data, blobs.keyring,
                                          expect_log_id=log_.log_id, expect_seq=seq)
        marked |= blob_refs(body, config.connectors)
        if not seeded:
            marked |= await _seed_refs(config, blobs, body.manifest.positions)
            seeded = True
        last = seq
    return marked, last


async def _seed_refs(config: Config, blobs: BlobStore, positions: dict[str, Any]) -> set[str]:
    """Blobs the oldest segment's state needs to rebuild a pruned log (model files)."""
    refs: set[str] = set()
    for stream, pos in positions.items():
        kind = config.connectors.kind_of(stream)
        events = await kind.seed(blobs, pos) if kind is not None else None
        if kind is not None and events:
            refs |= kind.blob_refs(None, events)
    return refs


def _now_ms() -> int:
    return int(time.time() * 1000)
