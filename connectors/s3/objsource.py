"""The object source: a bucket prefix on an S3 API endpoint (a dataset, a DVC remote)
shipped as content-addressed blobs plus typed events (docs/datasets.md).

Each scan lists the prefix (ListObjectVersions when versions are listed: new objects,
overwrites, delete markers, versions removed for good; ListObjectsV2 otherwise: ETag, size
and last-modified compared) and merges the listing with the state of the previous scan
(listing.py). Every change becomes one event; each new object version is read once,
streamed in `chunk_bytes` pieces into blobs (a chunk already stored, a DVC cache file or
a re-uploaded file, is not stored again).

The log is the source's memory. After a complete scan its positions are
`{"state": [state chunk ids]}`. A scan that captured more than `capture_budget_bytes`
hands over what it has with positions `{"done": [chunks of the new state up to
"cursor"], "rest": [chunks of the old state from the one holding "cursor"], "cursor":
key}`, and continues after `cursor` (the next scan after a restart does too): a first sync
of a large bucket is checkpointed in the log in steps, and a crash repeats at most one
step. A crash before a delivery is durable repeats its listing from the same positions:
events reach the log at least once, and the sink applies them idempotently.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from botocore.exceptions import BotoCoreError

from drstream.connectors.s3.events import HEADERS
from drstream.connectors.s3.listing import (
    Entry,
    StateError,
    StateWriter,
    changes,
    decode_chunk,
    key_order,
    newest_first,
)
from drstream.connectors.s3.objconfig import ObjectSourceConfig
from drstream.connectors.s3.store import S3Store, is_missing
from drstream.daemon.blobs import BlobStore
from drstream.daemon.codec import EventBatch
from drstream.daemon.errors import DrstreamError, SourceError, StoreError
from drstream.daemon.lifecycle import Closing
from drstream.daemon.logging import get_logger
from drstream.daemon.plugins import Context
from drstream.daemon.retry import poll_retry_s
from drstream.daemon.source import Delivery, SourceProbe

log = get_logger("drstream.s3.source")

RETRY_MAX_S = 30.0  # a failed scan step is retried after 0.5 s, doubling to this (or interval_s)
MAX_STEP_EVENTS = 10_000  # events per delivery: a segment's event JSON stays a few MB
LIST_PAGE = 1000  # keys per listing request (the S3 maximum)


def now_ms() -> int:
    return int(time.time() * 1000)


class OldState:
    """The previous scan's state, entry by entry in key order, one chunk in memory; knows
    which chunks are not yet used up (`rest`)."""

    def __init__(self, blobs: BlobStore, chunks: list[str], after: str | None) -> None:
        self.blobs = blobs
        self.chunks = chunks
        self.after = key_order(after) if after is not None else None
        self._index = 0  # chunk being read
        self._entries: list[Entry] = []
        self._pos = 0

    @property
    def rest(self) -> list[str]:
        return self.chunks[self._index:]

    async def peek(self) -> Entry | None:
        while self._pos >= len(self._entries):
            if self._entries:
                self._index += 1
            if self._index >= len(self.chunks):
                return None
            bid = self.chunks[self._index]
            self._entries = decode_chunk(await self.blobs.get(bid), f"state chunk {bid}")
            self._pos = 0
            if self.after is not None:
                while self._pos < len(self._entries) and \
                        key_order(self._entries[self._pos].key) <= self.after:
                    self._pos += 1
            if not self._entries:
                self._index += 1
        return self._entries[self._pos]

    def pop(self) -> None:
        self._pos += 1


class Chained:
    """Several OldStates read one after the other (a mid-scan position's state: the new
    chunks up to its cursor, then the old ones after it)."""

    def __init__(self, parts: list[OldState]) -> None:
        self.parts = parts

    async def peek(self) -> Entry | None:
        while self.parts:
            e = await self.parts[0].peek()
            if e is not None:
                return e
            self.parts.pop(0)
        return None

    def pop(self) -> None:
        self.parts[0].pop()


def shipped_state(blobs: BlobStore, positions: dict[str, Any]) -> Chained:
    """The state a position map names, whole: after a complete scan or in the middle of
    one."""
    if positions.get("cursor") is not None:
        return Chained([OldState(blobs, list(positions.get("done", [])), None),
                        OldState(blobs, list(positions.get("rest", [])), positions["cursor"])])
    return Chained([OldState(blobs, list(positions.get("state", [])), None)])


class ObjectSource(Closing):
    def __init__(self, config: ObjectSourceConfig, ctx: Context) -> None:
        self.config = config
        self.stream = config.stream
        self.log_id = ctx.log_id
        self.blobs = ctx.blobs
        self.where = f"sources[{self.stream}]"
        self.store = S3Store(config, where=self.where)
        self.url = f"s3://{config.bucket}/{config.prefix}"
        self._prefix = config.prefix + "/" if config.prefix else ""
        self._positions: dict[str, Any] = {}
        self._versioned: bool | None = None
        self._open = False
        self._scan: AsyncIterator[tuple[list[dict[str, Any]], dict[str, Any]]] | None = None
        self._next_at = 0.0
        self._failures = 0
        self.scans = 0

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, positions: dict[str, Any] | None) -> None:
        if self._open:
            return
        if self.blobs is None:
            raise SourceError(f"{self.stream}: the s3 object source needs a blob store")
        self._positions = dict(positions or {})
        await self.store.start()
        self._open = True
        self._versioned = await self._versions_listed()
        self._next_at = 0.0
        log.info("s3_source_started", stream=self.stream, source=self.url,
                 versions=self._versioned, resuming_after=self._positions.get("cursor"))

    async def _versions_listed(self) -> bool:
        if self.config.versions != "auto":
            return self.config.versions == "on"
        resp = await self.store.request("get bucket versioning", None, functools.partial(
            self.store.client.get_bucket_versioning, Bucket=self.config.bucket))
        return resp.get("Status") in ("Enabled", "Suspended")

    async def close(self) -> None:
        if self._scan is not None:
            with contextlib.suppress(Exception):
                await self._scan.aclose()  # type: ignore[attr-defined]
            self._scan = None
        if self._open:
            await self.store.close()
            self._open = False

    def reconfigure(self, config: ObjectSourceConfig) -> None:
        """Interval, chunk size and budget apply from the next scan; where it reads needs
        a restart."""
        self.config = config
        self._next_at = 0.0

    # -- reading ---------------------------------------------------------------------------

    async def read(self, timeout_s: float) -> Delivery | None:
        if self._scan is None:
            wait = self._next_at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(min(timeout_s, wait))
                if time.monotonic() < self._next_at:
                    return None
            self._scan = self._run_scan(dict(self._positions))
        try:
            events, positions = await anext(self._scan)
        except StopAsyncIteration:
            self._scan = None
            self._failures = 0
            self._next_at = time.monotonic() + self.config.interval_s
            return None
        except DrstreamError as e:
            self._scan = None
            if not e.retriable:
                raise
            self._failures += 1
            delay = poll_retry_s(self._failures, self.config.interval_s, RETRY_MAX_S)
            self._next_at = time.monotonic() + delay
            log.warning("s3_scan_failed", stream=self.stream, error=str(e),
                        retry_s=round(delay, 2))
            return None
        self._positions = positions
        return Delivery(batches=[], positions=dict(positions),
                        nbytes=len(json.dumps(events, separators=(",", ":"))),
                        events=[EventBatch(self.stream, events)] if events else [])

    async def _run_scan(self, pos: dict[str, Any]
                        ) -> AsyncIterator[tuple[list[dict[str, Any]], dict[str, Any]]]:
        """One scan: yields (events, positions) at each step; nothing when nothing
        changed."""
        assert self.blobs is not None
        cursor: str | None = pos.get("cursor")
        resumed = cursor is not None
        previous = list(pos.get("rest" if resumed else "state", []))
        writer = StateWriter(self.blobs, pos.get("done", []) if resumed else [],
                             known=frozenset(previous))
        old = OldState(self.blobs, previous, cursor)
        events: list[dict[str, Any]] = []
        captured, changed = 0, resumed
        self.scans += 1
        async for key, listed in self._listing(cursor):
            while (o := await old.peek()) is not None and key_order(o.key) < key_order(key):
                old.pop()
                changed |= await self._key(o, [], events, writer)
            o = await old.peek()
            prev = None
            if o is not None and o.key == key:
                prev = o
                old.pop()
            before = len(events)
            changed |= await self._key(prev, listed, events, writer)
            captured += sum(int(e.get("size", 0)) for e in events[before:])
            if captured >= self.config.capture_budget_bytes or len(events) >= MAX_STEP_EVENTS:
                await writer.flush()
                step = {"done": list(writer.chunks), "rest": old.rest, "cursor": key}
                yield events, step
                events, captured = [], 0
        while (o := await old.peek()) is not None:
            old.pop()
            changed |= await self._key(o, [], events, writer)
        if not changed:
            return
        await writer.flush()
        if events:
            log.info("s3_changes", stream=self.stream, events=len(events))
        yield events, {"state": list(writer.chunks)}

    async def _key(self, old: Entry | None, listed: list[Entry], events: list[dict[str, Any]],
                   writer: StateWriter) -> bool:
        """Ship what changed on one key; add its new state entry. Whether it changed."""
        todo = changes(old, listed)
        newest = listed[0] if listed else None
        for v in todo:
            if v.deleted:
                events.append(self._delete_event(v))
                continue
            ev, seen = await self._capture(v)
            if ev is None:  # gone between listing and reading: the next scan says more
                if v is todo[-1]:
                    newest = old
                continue
            events.append(ev)
            if v is todo[-1] and not self._versioned:
                newest = seen  # what was read, if it changed since the listing
        if newest is not None:
            await writer.add(newest)
        return bool(todo)

    def _delete_event(self, v: Entry) -> dict[str, Any]:
        return {"type": "object.deleted", "key": v.key, "version_id": v.version_id or None,
                "last_modified_ms": v.last_modified_ms or None, "seen_ms": now_ms()}

    # -- listing ---------------------------------------------------------------------------

    def _listing(self, after: str | None) -> AsyncIterator[tuple[str, list[Entry]]]:
        return self._versions(after) if self._versioned else self._objects(after)

    def _rel(self, full: str) -> str:
        return full[len(self._prefix):]

    async def _objects(self, after: str | None) -> AsyncIterator[tuple[str, list[Entry]]]:
        args: dict[str, Any] = {"Bucket": self.config.bucket, "Prefix": self._prefix,
                                "MaxKeys": LIST_PAGE}
        if after is not None:
            args["StartAfter"] = self._prefix + after
        while True:
            page = await self.store.request("list", self._prefix, functools.partial(
                self.store.client.list_objects_v2, **args))
            for o in page.get("Contents", []):
                rel = self._rel(o["Key"])
                yield rel, [Entry(rel, "", _etag(o.get("ETag")), int(o.get("Size", 0)),
                                  _ms(o.get("LastModified")))]
            if not page.get("IsTruncated"):
                return
            args["ContinuationToken"] = page["NextContinuationToken"]
            args.pop("StartAfter", None)

    async def _versions(self, after: str | None) -> AsyncIterator[tuple[str, list[Entry]]]:
        """Each key with its versions and delete markers, newest first; a key whose
        versions span pages is held until its last page."""
        args: dict[str, Any] = {"Bucket": self.config.bucket, "Prefix": self._prefix,
                                "MaxKeys": LIST_PAGE}
        if after is not None:
            args["KeyMarker"] = self._prefix + after
        held: list[Entry] = []
        latest: dict[str, str] = {}
        while True:
            page = await self.store.request("list versions", self._prefix, functools.partial(
                self.store.client.list_object_versions, **args))
            rows = [(v, False) for v in page.get("Versions", [])] + \
                [(m, True) for m in page.get("DeleteMarkers", [])]
            for v, marker in rows:
                rel = self._rel(v["Key"])
                if after is not None and key_order(rel) <= key_order(after):
                    continue  # some servers list the marker's own key again
                vid = str(v.get("VersionId") or "null")
                if v.get("IsLatest"):
                    latest[rel] = vid
                held.append(Entry(rel, vid, "" if marker else _etag(v.get("ETag")),
                                  0 if marker else int(v.get("Size", 0)),
                                  _ms(v.get("LastModified")), marker))
            held.sort(key=lambda e: key_order(e.key))  # stable: keeps newest-first order
            last = held[-1].key if held and page.get("IsTruncated") else None
            group: list[Entry] = []
            keep: list[Entry] = []
            for e in held:
                if e.key == last:
                    keep.append(e)
                    continue
                if group and group[0].key != e.key:
                    yield group[0].key, newest_first(group, latest.pop(group[0].key, None))
                    group = []
                group.append(e)
            if group:
                yield group[0].key, newest_first(group, latest.pop(group[0].key, None))
            held = keep
            if not page.get("IsTruncated"):
                return
            args["KeyMarker"] = page["NextKeyMarker"]
            if page.get("NextVersionIdMarker"):
                args["VersionIdMarker"] = page["NextVersionIdMarker"]
            else:
                args.pop("VersionIdMarker", None)

    # -- capture ---------------------------------------------------------------------------

    async def _capture(self, v: Entry) -> tuple[dict[str, Any] | None, Entry | None]:
        """Read one object version into blobs: its event and its entry as read (None,
        None when it is gone)."""
        assert self.blobs is not None
        full = self._prefix + v.key
        args: dict[str, Any] = {"Bucket": self.config.bucket, "Key": full}
        if v.version_id:
            args["VersionId"] = v.version_id
        try:
            resp = await self.store.request("get", full, functools.partial(
                self.store.client.get_object, **args))
        except StoreError as e:
            if is_missing(e):
                return None, None
            raise
        h = hashlib.sha256()
        ids: list[str] = []
        size = 0
        buf = bytearray()
        try:
            async with resp["Body"] as body:
                async for piece in body.iter_chunks(1 << 20):
                    buf += piece
                    while len(buf) >= self.config.chunk_bytes:
                        chunk = bytes(buf[:self.config.chunk_bytes])
                        del buf[:self.config.chunk_bytes]
                        h.update(chunk)
                        size += len(chunk)
                        ids.append(await self.blobs.put(chunk))
        except (OSError, TimeoutError, aiohttp.ClientError, BotoCoreError) as e:
            raise SourceError(f"{self.stream}: reading {full!r} broke off: {e}",
                              retriable=True) from e
        if buf or not ids:
            h.update(buf)
            size += len(buf)
            ids.append(await self.blobs.put(bytes(buf)))
        length = int(resp.get("ContentLength", size))
        if size != length:
            raise SourceError(f"{self.stream}: {full!r} read {size} bytes, the answer said "
                              f"{length}", retriable=True)
        seen = Entry(v.key, v.version_id, _etag(resp.get("ETag")) or v.etag, size,
                     _ms(resp.get("LastModified")) or v.last_modified_ms)
        ev = {"type": "object.put", "key": v.key, "version_id": v.version_id or None,
              "size": size, "sha256": h.hexdigest(), "etag": seen.etag,
              "last_modified_ms": seen.last_modified_ms,
              "content_type": resp.get("ContentType"),
              "metadata": dict(resp.get("Metadata") or {}),
              "headers": {k: resp[k] for k in HEADERS if resp.get(k)},
              "chunks": ids, "seen_ms": now_ms()}
        return ev, seen

    # -- pipeline hooks --------------------------------------------------------------------

    def positions(self) -> dict[str, Any]:
        return dict(self._positions)

    def release(self, nbytes: int) -> None:
        """Deliveries hold no buffered payload (object bytes are already blobs)."""

    async def durable(self, positions: dict[str, Any]) -> None:
        """Nothing to commit on the bucket."""

    async def probe(self, positions: dict[str, Any]) -> SourceProbe:
        """How many changes the live prefix has beyond `positions` (a listing compared
        with the state; no object is read), and the last-modified time of the oldest."""
        opened = not self._open
        try:
            if opened:
                await self.store.start()
                self._open = True
                self._versioned = await self._versions_listed()
            assert self.blobs is not None
            old = shipped_state(self.blobs, positions)
            pending, oldest = 0, None
            async for key, listed in self._listing(None):
                while (o := await old.peek()) is not None and key_order(o.key) < key_order(key):
                    old.pop()
                    pending += len(changes(o, []))
                o = await old.peek()
                prev = o if o is not None and o.key == key else None
                if prev is not None:
                    old.pop()
                for v in changes(prev, listed):
                    pending += 1
                    if v.last_modified_ms:
                        oldest = min(oldest or v.last_modified_ms, v.last_modified_ms)
            while (o := await old.peek()) is not None:
                old.pop()
                pending += len(changes(o, []))
            return SourceProbe(reachable=True, pending_records=pending,
                               oldest_pending_ms=oldest)
        except (StoreError, StateError) as e:
            return SourceProbe(reachable=False, error=str(e))
        finally:
            if opened:
                await self.close()


def _etag(value: Any) -> str:
    return str(value or "").strip('"')


def _ms(when: Any) -> int:
    return int(when.timestamp() * 1000) if hasattr(when, "timestamp") else 0


