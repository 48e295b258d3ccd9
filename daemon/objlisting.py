"""The object source's memory of a bucket prefix: what it listed and shipped, per key, in
key order, kept as content-addressed blobs ("state chunks") beside the log.

Change capture is a listing compared with this state (DESIGN.md section 8): each scan
walks the prefix page by page (1,000 keys per request, continuation tokens) and merges
it with the state chunks read one at a time, so memory holds one page, one old chunk and
the new chunk being filled, whatever the bucket's size. A chunk ends after a key whose
hash falls on a boundary (about STATE_CHUNK_AVG entries, at most STATE_CHUNK_MAX): an
unchanged key range keeps its chunk's bytes, hence its blob id, and is not stored again.

State chunk (plaintext of a blob; JSON, UTF-8, no whitespace):

    {"v": 1, "entries": [[key, version_id, etag, size, last_modified_ms, deleted], ...]}

keys strictly ascending (by UTF-8 bytes: S3's listing order), version_id "" for an
unversioned listing, deleted true for a delete marker that is a key's newest version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any, NamedTuple

from drstream.daemon.blobs import BlobStore, blob_id
from drstream.daemon.errors import DrstreamError

STATE_VERSION = 1
STATE_CHUNK_AVG = 4096  # entries: ~0.5 MB of JSON for 100-byte keys
STATE_CHUNK_MAX = 16384  # entries: a 1,024-byte key each stays under the 16 MiB blob limit


class StateError(DrstreamError):
    """A state chunk that does not hold what the format says."""


class Entry(NamedTuple):
    """One listed object (or delete marker): what the state keeps of a key's newest
    version, and what a listing yields for each version."""

    key: str  # relative to the source prefix
    version_id: str  # "" unversioned
    etag: str
    size: int
    last_modified_ms: int
    deleted: bool = False  # a delete marker

    def to_json(self) -> list[Any]:
        return [self.key, self.version_id, self.etag, self.size, self.last_modified_ms,
                self.deleted]


def key_order(key: str) -> bytes:
    """S3 lists keys in the order of their UTF-8 bytes (not of Python's code points)."""
    return key.encode()


def encode_chunk(entries: Sequence[Entry]) -> bytes:
    return json.dumps({"v": STATE_VERSION, "entries": [e.to_json() for e in entries]},
                      ensure_ascii=False, separators=(",", ":")).encode()


def decode_chunk(raw: bytes, where: str) -> list[Entry]:
    try:
        doc = json.loads(raw)
        if doc.get("v") != STATE_VERSION:
            raise ValueError(f"version {doc.get('v')!r}, expected {STATE_VERSION}")
        out: list[Entry] = []
        for row in doc["entries"]:
            key, vid, etag, size, lm, deleted = row
            if not (isinstance(key, str) and isinstance(vid, str) and isinstance(etag, str)
                    and type(size) is int and size >= 0 and type(lm) is int
                    and isinstance(deleted, bool)):
                raise ValueError(f"malformed entry {row!r:.200}")
            if out and key_order(out[-1].key) >= key_order(key):
                raise ValueError(f"keys out of order at {key!r:.200}")
            out.append(Entry(key, vid, etag, size, lm, deleted))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise StateError(f"{where}: unreadable state chunk: {e}") from e
    return out


def is_boundary(key: str) -> bool:
    """Whether a state chunk ends after `key` (content-defined: about 1 in STATE_CHUNK_AVG)."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big")
    return h % STATE_CHUNK_AVG == 0


class StateWriter:
    """Collects the new state in key order and stores it chunk by chunk."""

    def __init__(self, blobs: BlobStore, chunks: Sequence[str] = (),
                 known: frozenset[str] = frozenset()) -> None:
        self.blobs = blobs
        self.chunks: list[str] = list(chunks)  # ids of the chunks stored so far, in order
        # chunks of the previous state: stored already, so an unchanged key range costs
        # no request at all (a quiet prefix of a million keys: no 250 HEADs per scan)
        self.known = known
        self._pending: list[Entry] = []

    async def add(self, entry: Entry) -> None:
        self._pending.append(entry)
        if is_boundary(entry.key) or len(self._pending) >= STATE_CHUNK_MAX:
            await self.flush()

    async def flush(self) -> None:
        if self._pending:
            data = encode_chunk(self._pending)
            bid = blob_id(data)
            self.chunks.append(bid if bid in self.known else await self.blobs.put(data))
            self._pending = []


async def read_state(blobs: BlobStore, chunks: Sequence[str],
                     after: str | None = None) -> AsyncIterator[Entry]:
    """The entries of the state chunks, in key order, those after `after` only; one chunk
    in memory at a time."""
    last: bytes | None = None
    for bid in chunks:
        for e in decode_chunk(await blobs.get(bid), f"state chunk {bid}"):
            k = key_order(e.key)
            if last is not None and k <= last:
                raise StateError(f"state chunk {bid}: key {e.key!r:.200} out of order with "
                                 "the chunk before it")
            last = k
            if after is None or k > key_order(after):
                yield e


def newest_first(versions: Sequence[Entry], latest: str | None) -> list[Entry]:
    """A key's versions newest first: the one S3 marks latest, then by last-modified
    (ListObjectVersions reports versions and delete markers in two lists)."""
    return sorted(versions, key=lambda v: (v.version_id == latest, v.last_modified_ms),
                  reverse=True)


def changes(old: Entry | None, listed: Sequence[Entry]) -> list[Entry]:
    """What happened to one key since the state's entry `old`, oldest first: the versions
    (or delete markers) to ship; of several in one second, only the newest is sure to be.
    `listed` is the key's versions newest first (one entry for an unversioned listing;
    none when the key is gone). A key gone from the listing while the state holds it live
    yields a delete without version."""
    if not listed:
        if old is None or old.deleted:
            return []
        return [Entry(old.key, "", "", 0, 0, True)]
    if old is None:
        return list(reversed(listed))
    if not old.version_id:  # unversioned: one entry per key
        now = listed[0]
        same = (now.etag, now.size, now.last_modified_ms, now.deleted) == (
            old.etag, old.size, old.last_modified_ms, old.deleted)
        return [] if same else [now]
    # Newer by last-modified, not by place in the listing: a listing gives versions and
    # delete markers apart, and its times have a resolution of one second, so the order of
    # two changes within one second is unknown; the newest (IsLatest) is always known.
    newer = [v for v in listed if v.last_modified_ms > old.last_modified_ms]
    if not newer and listed[0].version_id != old.version_id:
        newer = [listed[0]]  # a change in the shipped one's second, or it was removed
    return list(reversed(newer))
