"""The object source: a bucket prefix (a dataset, a DVC remote) on any object store shipped
as content-addressed blobs plus typed events (docs/datasets.md). What is the same on every
store lives here; a store's connector gives a BucketReader (list a prefix page by page,
read one object streamed) and the config of where the prefix is.

Each scan lists the prefix (each key with its versions when the reader lists versions:
new objects, overwrites, delete markers, versions removed for good; else one entry per
key, its ETag or generation, size and last-modified compared) and merges the listing with
the state of the previous scan (objlisting.py). Every change becomes one event; each new
object version is read once, streamed in `chunk_bytes` pieces into blobs (a chunk already
stored, a DVC cache file or a re-uploaded file, is not stored again).

The log is the source's memory. After a complete scan its positions are
`{"state": [state chunk ids]}`. A scan that captured more than `capture_budget_bytes`
hands over what it has with positions `{"done": [chunks of the new state up to
"cursor"], "rest": [chunks of the old state from the one holding "cursor"], "cursor":
key}`, and continues after `cursor` (the next scan after a restart does too): a first sync
of a large bucket is checkpointed in the log in steps, and a crash repeats at most one
step. A crash before a delivery is durable repeats its listing from the same positions:
events reach the log at least once, and the sink applies them idempotently.

A store's connector may add a WakeHint (S3: bucket notifications through SQS): a scan
then starts as soon as the hint says the bucket changed, not only every `interval_s`.
The listing still decides what changed, so a hint lost or wrong costs latency only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, Generic, NamedTuple, Protocol, TypeVar

from pydantic import BaseModel, Field

from drstream.daemon.blobs import MAX_CHUNK, BlobStore
from drstream.daemon.codec import EventBatch
from drstream.daemon.errors import DrstreamError, SourceError, StoreError
from drstream.daemon.lifecycle import Closing, Starting
from drstream.daemon.logging import get_logger
from drstream.daemon.objlisting import (
    Entry,
    StateError,
    StateWriter,
    changes,
    decode_chunk,
    key_order,
)
from drstream.daemon.plugins import Context
from drstream.daemon.retry import poll_retry_s
from drstream.daemon.source import Delivery, SourceProbe

log = get_logger("drstream.objects.source")

RETRY_MAX_S = 30.0  # a failed scan step is retried after 0.5 s, doubling to this (or interval_s)
MAX_STEP_EVENTS = 10_000  # events per delivery: a segment's event JSON stays a few MB

NAME_RE = r"^[A-Za-z0-9._-]{1,64}$"
DEFAULT_INTERVAL_S = 30.0
# S3 refuses multipart parts under 5 MiB (the last excepted): an object's chunks become
# its parts on an S3 standby, so a chunk is never smaller.
MIN_PART_BYTES = 5 << 20
DEFAULT_CHUNK_BYTES = 8 << 20
# Object bytes captured before the source hands what it has to the log (one Delivery, so
# one segment): a long first sync is checkpointed in the log in steps this size.
DEFAULT_CAPTURE_BUDGET_BYTES = 256 << 20


class ObjectSourceFields(BaseModel):
    """What every object source's config says besides where the prefix is (the store's
    connector adds that); its stream is `<KIND>:<name>`. First among a config's bases:
    its `stream` is the one that counts."""

    KIND: ClassVar[str]  # the connector's name
    name: str = Field("datasets", pattern=NAME_RE,
                      description="the stream is '<connector>:<name>'")
    interval_s: float = Field(DEFAULT_INTERVAL_S, gt=0, le=86400,
                              description="list the whole prefix this often")
    capture_budget_bytes: int = Field(DEFAULT_CAPTURE_BUDGET_BYTES, ge=1 << 20, le=1 << 40)
    chunk_bytes: int = Field(DEFAULT_CHUNK_BYTES, ge=MIN_PART_BYTES, le=MAX_CHUNK,
                             description="objects are shipped in blobs of this size")

    @property
    def stream(self) -> str:
        return f"{self.KIND}:{self.name}"


class ObjectRead(NamedTuple):
    """One object version as a store answers a read: its properties, and its bytes in
    pieces of the reader's size (a reader wraps a broken stream as a retriable
    SourceError)."""

    etag: str  # the change token: ETag, or GCS generation
    length: int | None  # what the answer says the size is
    last_modified_ms: int
    content_type: str | None
    metadata: dict[str, str]
    headers: dict[str, str]  # events.HEADERS names: CacheControl, ...
    pieces: AsyncIterator[bytes]


class BucketReader(Protocol):
    """What the object source needs of a store: keys are relative to the prefix, and
    listed in the order of their UTF-8 bytes (key_order), each request one bounded page."""

    url: str  # where the prefix is, for messages: s3://bucket/prefix

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def versioned(self) -> bool:
        """Whether the listing yields each key's versions (and delete markers)."""
        ...

    def listing(self, versioned: bool, after: str | None
                ) -> AsyncIterator[tuple[str, list[Entry]]]:
        """Each key after `after` with its versions newest first (one entry unversioned)."""
        ...

    def read(self, key: str, version_id: str) -> AbstractAsyncContextManager[ObjectRead | None]:
        """The object (that version when version_id is not ""), None when it is gone."""
        ...


class WakeHint(Protocol):
    """A latency hint of a store, optional (bucket event notifications): it calls `wake`
    whenever the bucket says something changed, however often; the source then starts
    its next scan at once instead of after `interval_s`. Nothing it says is read for what
    changed. A hint that cannot reach its service must not raise: the source lists every
    `interval_s` meanwhile."""

    async def start(self, wake: Callable[[], None]) -> None: ...

    async def close(self) -> None: ...


ST = TypeVar("ST", bound=Starting)


class StoreReader(Generic[ST]):
    """A BucketReader's lifecycle over a store of its connector (`start`, `close`), and
    no version listing unless a subclass has one."""

    store: ST

    async def start(self) -> None:
        await self.store.start()

    async def close(self) -> None:
        await self.store.close()

    async def versioned(self) -> bool:
        return False


def past(key: str, after: str | None) -> bool:
    """Whether a listed key lies after `after` (listings that start at a key may list that
    key itself again)."""
    return after is None or key_order(key) > key_order(after)


def now_ms() -> int:
    return int(time.time() * 1000)


def plain_etag(value: Any) -> str:
    """An ETag without its quotes ("" for none)."""
    return str(value or "").strip('"')


def epoch_ms(when: Any) -> int:
    """A datetime from a store's client as ms since the epoch (0 when there is none)."""
    return int(when.timestamp() * 1000) if hasattr(when, "timestamp") else 0


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
    """A bucket prefix as a source, whatever the store: `reader` lists and reads it;
    `hint`, when the store has one configured, wakes the next scan early."""

    def __init__(self, config: ObjectSourceFields, ctx: Context, reader: BucketReader,
                 hint: WakeHint | None = None) -> None:
        self.config = config
        self.stream = config.stream
        self.log_id = ctx.log_id
        self.blobs = ctx.blobs
        self.reader = reader
        self.url = reader.url
        self.hint = hint
        self._positions: dict[str, Any] = {}
        self._versioned: bool | None = None
        self._open = False
        self._scan: AsyncIterator[tuple[list[dict[str, Any]], dict[str, Any]]] | None = None
        self._next_at = 0.0
        self._failures = 0
        self._wake = asyncio.Event()  # set by the hint: scan at once
        self._hinting = False
        self.scans = 0

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, positions: dict[str, Any] | None) -> None:
        if self._open:
            return
        if self.blobs is None:
            raise SourceError(f"{self.stream}: the object source needs a blob store")
        self._positions = dict(positions or {})
        await self.reader.start()
        self._open = True
        self._versioned = await self.reader.versioned()
        self._next_at = 0.0
        if self.hint is not None and not self._hinting:
            await self.hint.start(self._wake.set)
            self._hinting = True
        log.info("object_source_started", stream=self.stream, source=self.url,
                 versions=self._versioned, resuming_after=self._positions.get("cursor"))

    async def close(self) -> None:
        if self.hint is not None and self._hinting:
            self._hinting = False
            await self.hint.close()
        if self._scan is not None:
            with contextlib.suppress(Exception):
                await self._scan.aclose()  # type: ignore[attr-defined]
            self._scan = None
        if self._open:
            await self.reader.close()
            self._open = False

    def reconfigure(self, config: ObjectSourceFields) -> None:
        """Interval, chunk size and budget apply from the next scan; where it reads and
        its hint need a restart."""
        self.config = config
        self._next_at = 0.0

    # -- reading ---------------------------------------------------------------------------

    async def read(self, timeout_s: float) -> Delivery | None:
        if self._scan is None:
            wait = self._next_at - time.monotonic()
            if wait > 0 and not self._woken():
                await self._sleep(min(timeout_s, wait))
                if time.monotonic() < self._next_at and not self._woken():
                    return None
            self._wake.clear()  # a hint from now on calls for another scan
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
            log.warning("object_scan_failed", stream=self.stream, error=str(e),
                        retry_s=round(delay, 2))
            return None
        self._positions = positions
        return Delivery(batches=[], positions=dict(positions),
                        nbytes=len(json.dumps(events, separators=(",", ":"))),
                        events=[EventBatch(self.stream, events)] if events else [])

    def _woken(self) -> bool:
        return self._wake.is_set() and not self._failures

    async def _sleep(self, seconds: float) -> None:
        """Wait `seconds`, or until the hint wakes the source (not while a failed scan
        backs off: a hint does not call for retries)."""
        if self._failures:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

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
            log.info("object_changes", stream=self.stream, events=len(events))
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

    async def _listing(self, after: str | None) -> AsyncIterator[tuple[str, list[Entry]]]:
        """The reader's listing, checked to be in key order: the merge with the state
        relies on it (a key out of order would read as deleted, then as created)."""
        last = key_order(after) if after is not None else None
        async for key, listed in self.reader.listing(bool(self._versioned), after):
            k = key_order(key)
            if last is not None and k <= last:
                raise SourceError(f"{self.stream}: {self.url} listed {key!r} after a key that "
                                  "sorts at or after it in UTF-8 byte order; the object "
                                  "source needs listings in that order")
            last = k
            yield key, listed

    # -- capture ---------------------------------------------------------------------------

    async def _capture(self, v: Entry) -> tuple[dict[str, Any] | None, Entry | None]:
        """Read one object version into blobs: its event and its entry as read (None,
        None when it is gone)."""
        async with self.reader.read(v.key, v.version_id) as got:
            if got is None:
                return None, None
            sha, size, ids = await self._chunks(got.pieces)
        if got.length is not None and size != got.length:
            raise SourceError(f"{self.stream}: {v.key!r} read {size} bytes, the answer said "
                              f"{got.length}", retriable=True)
        seen = Entry(v.key, v.version_id, got.etag or v.etag, size,
                     got.last_modified_ms or v.last_modified_ms)
        ev = {"type": "object.put", "key": v.key, "version_id": v.version_id or None,
              "size": size, "sha256": sha, "etag": seen.etag,
              "last_modified_ms": seen.last_modified_ms, "content_type": got.content_type,
              "metadata": got.metadata, "headers": got.headers, "chunks": ids,
              "seen_ms": now_ms()}
        return ev, seen

    async def _chunks(self, pieces: AsyncIterator[bytes]) -> tuple[str, int, list[str]]:
        """The stream cut into `chunk_bytes` blobs: (sha256, size, blob ids); one chunk in
        memory."""
        assert self.blobs is not None
        h = hashlib.sha256()
        ids: list[str] = []
        size = 0
        buf = bytearray()
        async for piece in pieces:
            buf += piece
            while len(buf) >= self.config.chunk_bytes:
                chunk = bytes(buf[:self.config.chunk_bytes])
                del buf[:self.config.chunk_bytes]
                h.update(chunk)
                size += len(chunk)
                ids.append(await self.blobs.put(chunk))
        if buf or not ids:
            h.update(buf)
            size += len(buf)
            ids.append(await self.blobs.put(bytes(buf)))
        return h.hexdigest(), size, ids

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
                await self.reader.start()
                self._open = True
                self._versioned = await self.reader.versioned()
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

