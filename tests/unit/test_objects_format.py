"""The object stream's formats and change rules: state chunks (round trip, order, any
flipped byte of a stored chunk detected), the listing diff (folding its changes over the
old listing gives the new one), event validation, and the typed config."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from drstream.connectors.file.store import FileStore, FileStoreConfig
from drstream.connectors.s3.events import validate_event
from drstream.connectors.s3.objconfig import ObjectSinkConfig, ObjectSourceConfig
from drstream.daemon.blobs import BlobStore
from drstream.daemon.errors import BlobError
from drstream.daemon.keyring import KeyRing
from drstream.daemon.objlisting import (
    Entry,
    StateError,
    StateWriter,
    changes,
    decode_chunk,
    encode_chunk,
    key_order,
    read_state,
)

keys = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
               max_size=12)
entries = st.builds(Entry, keys, st.sampled_from(["", "v1", "null"]), st.text(max_size=8),
                    st.integers(0, 2**40), st.integers(0, 2**42), st.booleans())


def _sorted_unique(rows: list[Entry]) -> list[Entry]:
    seen: dict[str, Entry] = {}
    for e in rows:
        seen.setdefault(e.key, e)
    return sorted(seen.values(), key=lambda e: key_order(e.key))


@given(st.lists(entries, max_size=40))
def test_state_chunk_round_trips(rows: list[Entry]) -> None:
    rows = _sorted_unique(rows)
    assert decode_chunk(encode_chunk(rows), "t") == rows


def test_state_chunk_refuses_disorder_and_malformed_entries() -> None:
    a, b = Entry("a", "", "e", 1, 2), Entry("b", "", "e", 1, 2)
    with pytest.raises(StateError, match="out of order"):
        decode_chunk(encode_chunk([b, a]), "t")
    with pytest.raises(StateError, match="malformed"):
        decode_chunk(b'{"v":1,"entries":[["a","","e",-1,2,false]]}', "t")
    with pytest.raises(StateError, match="version"):
        decode_chunk(b'{"v":9,"entries":[]}', "t")


def _blobs(store: FileStore) -> BlobStore:
    return BlobStore(store, "log-a", KeyRing({"k1": bytes(range(32))}, "k1"))


def test_state_in_chunks_reads_back_after_a_cursor_and_any_flipped_byte_fails(
        tmp_path: Path) -> None:
    rows = [Entry(f"k{i:05d}", "", "etag", i, i) for i in range(9000)]  # several chunks

    async def run() -> None:
        async with FileStore(FileStoreConfig(type="file", path=str(tmp_path / "store"))) as fs:
            await check(_blobs(fs))

    async def check(blobs: BlobStore) -> None:
        writer = StateWriter(blobs)
        for e in rows:
            await writer.add(e)
        await writer.flush()
        assert len(writer.chunks) > 1
        assert [e async for e in read_state(blobs, writer.chunks)] == rows
        assert [e async for e in read_state(blobs, writer.chunks, after="k04999")] == rows[5000:]
        path = next((tmp_path / "store" / "blobs").rglob(writer.chunks[0]))
        raw = bytearray(path.read_bytes())
        for i in (0, 10, len(raw) // 2, len(raw) - 1):
            flipped = bytearray(raw)
            flipped[i] ^= 0x40
            path.write_bytes(bytes(flipped))
            with pytest.raises(BlobError, match=writer.chunks[0]):
                _ = [e async for e in read_state(blobs, writer.chunks)]
        path.write_bytes(bytes(raw))

    asyncio.run(run())


# -- the listing diff ---------------------------------------------------------------------

objects = st.dictionaries(st.sampled_from(list("abcdefg")),
                          st.tuples(st.sampled_from(["e1", "e2", "e3"]), st.integers(0, 3)),
                          max_size=7)


@given(objects, objects)
def test_unversioned_changes_fold_the_old_listing_into_the_new(
        old: dict[str, tuple[str, int]], new: dict[str, tuple[str, int]]) -> None:
    state = {k: Entry(k, "", etag, size, 1000) for k, (etag, size) in old.items()}
    now = {k: Entry(k, "", etag, size, 1000) for k, (etag, size) in new.items()}
    shipped = 0
    for k in sorted(set(state) | set(now)):
        for v in changes(state.get(k), [now[k]] if k in now else []):
            shipped += 1
            if v.deleted:
                state.pop(k)
            else:
                state[k] = v
    assert state == now
    assert shipped == sum(1 for k in set(state) | set(old)
                          if (k in old) != (k in new) or (k in new and old[k] != new[k]))


@given(st.lists(st.booleans(), min_size=1, max_size=8), st.integers(0, 8),
       st.sets(st.integers(0, 7)))
def test_versioned_changes_ship_every_version_newer_than_the_shipped_one(
        markers: list[bool], shipped_upto: int, removed: set[int]) -> None:
    """A key's history v0..vn (True: a delete marker), the state holds v[shipped_upto-1];
    versions in `removed` were deleted for good since. What ships is every remaining
    version after the shipped one, oldest first (or the latest when that one is gone and
    nothing is newer)."""
    history = [Entry("k", f"v{i}", "" if m else f"e{i}", 0 if m else i, 1000 + i, m)
               for i, m in enumerate(markers)]
    old = history[shipped_upto - 1] if 0 < shipped_upto <= len(history) else None
    listed = [v for i, v in enumerate(history) if i not in removed][::-1]  # newest first
    out = changes(old, listed)
    if not listed:
        assert out == ([] if old is None or old.deleted else [Entry("k", "", "", 0, 0, True)])
        return
    newer = [v for v in listed[::-1] if old is None or v.last_modified_ms > old.last_modified_ms]
    latest_moved = old is not None and listed[0].version_id != old.version_id
    assert out == (newer or ([listed[0]] if latest_moved else []))
    if out:
        assert out[-1] == listed[0]  # the standby ends at the newest version


def test_a_version_in_the_shipped_ones_second_is_not_shipped_again() -> None:
    """Listing times have one-second resolution and versions and delete markers come in
    two lists: after shipping the delete marker of second t, a re-creation at t+5 ships
    only the re-creation, not the version of second t listed beside the marker."""
    v1 = Entry("b", "v1", "e1", 3, 5000)
    marker = Entry("b", "m", "", 0, 5000, True)
    v3 = Entry("b", "v3", "e3", 4, 10000)
    assert changes(marker, [v3, v1, marker]) == [v3]
    assert changes(v1, [marker, v1]) == [marker]  # latest, in the same second


# -- events -------------------------------------------------------------------------------

PUT: dict[str, Any] = {
    "type": "object.put", "key": "a b/ü.txt", "version_id": None, "size": 3,
    "sha256": "0" * 64, "etag": "x", "last_modified_ms": 1, "content_type": "text/plain",
    "metadata": {"k": "v"}, "headers": {"CacheControl": "no-cache"}, "chunks": ["1" * 64],
    "seen_ms": 2}
DELETE: dict[str, Any] = {"type": "object.deleted", "key": "a", "version_id": "m1",
                          "last_modified_ms": None, "seen_ms": 2}


def test_valid_events_pass() -> None:
    assert validate_event(dict(PUT)) == PUT
    assert validate_event(dict(DELETE)) == DELETE


@pytest.mark.parametrize("field,value", [
    ("type", "object.moved"), ("key", ""), ("key", "k" * 1025), ("size", -1),
    ("size", "3"), ("sha256", "A" * 64), ("metadata", {"k": 1}), ("headers", {"X-Y": "z"}),
    ("chunks", []), ("chunks", ["../x"]), ("seen_ms", None), ("version_id", 5),
    ("extra", 1),
])
def test_malformed_put_events_are_refused(field: str, value: Any) -> None:
    with pytest.raises(ValueError):
        validate_event({**PUT, field: value})


# -- config -------------------------------------------------------------------------------

def test_config_rejects_unknown_keys_small_chunks_and_a_checkpoint_inside_the_prefix() -> None:
    base = {"type": "s3", "bucket": "data-bucket", "prefix": "ds"}
    assert ObjectSourceConfig.model_validate(base).stream == "s3:datasets"
    for bad in ({"colour": "red"}, {"chunk_bytes": 1 << 20}, {"versions": "maybe"},
                {"access_key_id": "AKIAINLINE"}):
        with pytest.raises(ValidationError):
            ObjectSourceConfig.model_validate({**base, **bad})
    assert ObjectSinkConfig.model_validate(base).sink_name == "s3:standby"
    with pytest.raises(ValidationError, match="checkpoint_prefix"):
        ObjectSinkConfig.model_validate({**base, "prefix": ""})
    with pytest.raises(ValidationError, match="checkpoint_prefix"):
        ObjectSinkConfig.model_validate({**base, "prefix": "x", "checkpoint_prefix": "x/cp"})
    ObjectSinkConfig.model_validate({**base, "prefix": "", "checkpoint_bucket": "other-bucket"})


@settings(max_examples=30)
@given(st.lists(entries, max_size=30))
def test_any_flipped_byte_of_a_state_chunk_plaintext_is_caught_or_harmless(
        rows: list[Entry]) -> None:
    """The blob envelope authenticates chunks; below it the decoder still refuses what
    breaks the format instead of yielding out-of-order or mistyped entries."""
    raw = bytearray(encode_chunk(_sorted_unique(rows)))
    for i in range(0, len(raw), max(1, len(raw) // 16)):
        flipped = bytearray(raw)
        flipped[i] ^= 0x01
        try:
            out = decode_chunk(bytes(flipped), "t")
        except StateError:
            continue
        assert all(key_order(a.key) < key_order(b.key) for a, b in itertools.pairwise(out))


def test_an_unchanged_state_is_written_again_without_a_request(tmp_path: Path) -> None:
    rows = [Entry(f"k{i:05d}", "", "etag", i, i) for i in range(9000)]

    async def run() -> None:
        async with FileStore(FileStoreConfig(type="file", path=str(tmp_path / "store"))) as fs:
            blobs = _blobs(fs)
            first = StateWriter(blobs)
            for e in rows:
                await first.add(e)
            await first.flush()
            stored = blobs.uploaded
            again = StateWriter(blobs, known=frozenset(first.chunks))
            for e in rows:
                await again.add(e)
            await again.flush()
            assert again.chunks == first.chunks
            assert (blobs.uploaded, blobs.skipped) == (stored, 0)  # not even a HEAD

    asyncio.run(run())
