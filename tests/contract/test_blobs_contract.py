"""Blobs (artifact chunks, registry state) on every store: round trip, dedup, tamper."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drstream.daemon.blobs import MAX_CHUNK, BlobStore, blob_id, blob_key, decode_blob, encode_blob
from drstream.daemon.errors import BlobError
from drstream.daemon.keyring import KeyRing
from drstream.daemon.store import Store

KEYS = KeyRing({"k1": bytes(range(32)), "k2": bytes(32)}, active="k1")


async def test_put_get_roundtrip_and_dedup(store: Store) -> None:
    blobs = BlobStore(store, "bl", KEYS)
    data = os.urandom(3 << 20)
    bid = await blobs.put(data)
    assert bid == blob_id(data)
    assert await blobs.put(data) == bid
    assert (blobs.uploaded, blobs.skipped) == (1, 1)
    assert await blobs.get(bid) == data
    assert await blobs.has(bid)
    # outside logs/: a segment listing never sees a blob
    assert [k async for k in store.list("logs/")] == []


async def test_missing_and_malformed_ids_are_named(store: Store) -> None:
    blobs = BlobStore(store, "bl", KEYS)
    missing = "ab" * 32
    with pytest.raises(BlobError, match=f"blobs/bl/ab/{missing}.*missing"):
        await blobs.get(missing)
    with pytest.raises(BlobError, match="malformed blob id"):
        await blobs.get("../../logs/x")


async def test_tampered_blob_fails_naming_its_key(store: Store) -> None:
    blobs = BlobStore(store, "bl", KEYS)
    bid = await blobs.put(b"model weights" * 100)
    raw = await store.get(blobs.key(bid))
    assert raw is not None
    bad = bytearray(raw)
    bad[-5] ^= 1
    await store.delete(blobs.key(bid))
    await store.put_if_absent(blobs.key(bid), bytes(bad))
    with pytest.raises(BlobError, match=f"blobs/bl/{bid[:2]}/{bid}"):
        await blobs.get(bid)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096), st.integers(min_value=0))
def test_every_flipped_byte_is_detected(data: bytes, where: int) -> None:
    raw = encode_blob(data, KEYS, "bl")
    bid = blob_id(data)
    assert decode_blob(raw, KEYS, "bl", bid) == data
    bad = bytearray(raw)
    bad[where % len(bad)] ^= 0x40
    with pytest.raises(BlobError):
        decode_blob(bytes(bad), KEYS, "bl", bid)


def test_moved_wrong_log_wrong_key_truncated() -> None:
    data = b"x" * 1000
    raw = encode_blob(data, KEYS, "bl")
    bid = blob_id(data)
    other = blob_id(b"y")
    with pytest.raises(BlobError, match="authentication failed"):
        decode_blob(raw, KEYS, "bl", other)  # copied under another name
    with pytest.raises(BlobError, match="authentication failed"):
        decode_blob(raw, KEYS, "other-log", bid)
    with pytest.raises(BlobError, match="authentication failed"):
        decode_blob(raw, KeyRing({"k1": bytes(32)}, active="k1"), "bl", bid)
    with pytest.raises(BlobError, match="not in the key ring"):
        decode_blob(raw, KeyRing({"k9": bytes(32)}, active="k9"), "bl", bid)
    with pytest.raises(BlobError):
        decode_blob(raw[:10], KEYS, "bl", bid)
    assert blob_key("bl", bid).startswith("blobs/bl/")


def test_oversized_chunk_refused() -> None:
    with pytest.raises(BlobError, match="over the"):
        encode_blob(bytes(MAX_CHUNK + 1), KEYS, "bl")
