"""Removed, hidden, oversized and unfenced: what the log store can do to a log besides
damaging a segment, each seen and named, on the file store, the moto S3 server,
fake-gcs-server and Azurite.

Truncation seen against the standby's checkpoint needs a real sink: that is in
tests/integration/test_log_integrity_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from drstream.connectors.mlflow.events import dump_state, empty_state, fold
from drstream.daemon import envelope
from drstream.daemon.blobs import MAX_CHUNK, BlobStore, _derive, blob_id
from drstream.daemon.codec import Body, EventBatch, make_manifest
from drstream.daemon.deltalog import DeltaLog, LogWriter
from drstream.daemon.errors import BlobError, LogStateError, StoreError
from drstream.daemon.layout import blob_key, segments_prefix
from drstream.daemon.prune import prune
from drstream.daemon.segment import encode_segment, segment_digest
from drstream.daemon.store import ObjectTooLargeError, Store
from drstream.daemon.verify import verify_log
from tests.contract.integrity import (
    DEAD_SOURCE,
    LOG,
    LogSetup,
    contents,
    make_log,
    open_setup,
    param_setup,
    s3_fields,
    versioned_bucket,
)
from tests.contract.test_deltalog_contract import body
from tests.infra.s3 import S3Server
from tests.infra.tcp_proxy import TcpProxy
from tests.support.procs import drstream, show


@pytest.fixture(params=["file", "s3", "gcs", "azure"])
async def setup(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LogSetup]:
    async with param_setup(request, tmp_path) as s:
        yield s


class CountingStore:
    """A real store that counts whole-object GETs of segments (not a mock)."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.url, self.segment_gets = inner, inner.url, 0

    async def get(self, key: str, max_bytes: int | None = None) -> bytes | None:
        self.segment_gets += key.startswith(segments_prefix(LOG))
        return await self.inner.get(key, max_bytes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# --------------------------------------------------------------------------- 4. removed


async def test_oldest_segments_deleted_by_hand_are_seen(setup: LogSetup) -> None:
    # one upload at a time: seq 4 names seq 3 durable, so the log may have been pruned to
    # start there (a first segment written before seq 1 was durable never starts one:
    # tests/unit/test_log_start.py)
    await make_log(setup, 12, max_in_flight=1)
    for seq in (1, 2, 3):
        await setup.store.delete(setup.key(seq))
    report = await verify_log(DeltaLog(setup.store, LOG))
    assert [(p.seq, p.kind) for p in report.problems] == [(1, "missing")], report.problems
    assert "seqs 1..3 missing at the start" in report.problems[0].message
    res = await asyncio.to_thread(drstream, "verify", "--config", str(setup.config_path))
    assert res.returncode == 1 and "no `drstream prune` removed them" in res.stdout, show(res)
    # a later prune does not explain what it did not remove
    await prune(setup.config, setup.store, setup.keyring, 0.0)
    report = await verify_log(DeltaLog(setup.store, LOG))
    assert [(p.seq, p.kind) for p in report.problems] == [(1, "missing")], report.problems


async def test_the_start_removed_by_prune_is_not_a_problem(setup: LogSetup) -> None:
    await make_log(setup, 12)
    result = await prune(setup.config, setup.store, setup.keyring, 0.0)
    assert result.deleted == list(range(1, 12)) and result.audit_object
    report = await verify_log(DeltaLog(setup.store, LOG))
    assert report.ok and report.first_seq == 12, report.problems


async def test_prune_reads_headers_only_and_the_real_retain_until_date(
        request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Segments written 10 days ago into an Object Lock bucket that retains for a day from
    the write: prune must read each object's own retain-until (it started at the upload,
    now), not guess `created_at + retain_days` (long past), and never download a segment."""
    s3: S3Server = request.getfixturevalue("s3")
    bucket = s3.create_bucket(object_lock=True)
    fields = s3_fields(request, bucket, object_lock={"mode": "GOVERNANCE", "retain_days": 1})
    try:
        async with open_setup("s3", fields, tmp_path) as s:
            written = int(time.time() * 1000) - 10 * 86_400_000
            prev = bytes(32)
            for seq in range(1, 6):
                data = encode_segment(body(1, start=seq), log_id=LOG, seq=seq, prev_digest=prev,
                                      keyring=s.keyring, created_at_ms=written + seq)
                assert await s.store.put_if_absent(s.key(seq), data)
                prev = segment_digest(data)
            counting = CountingStore(s.store)
            result = await prune(s.config, counting, s.keyring, 86_400.0)  # type: ignore[arg-type]
            assert result.deleted == [] and result.locked == [1], result
            until = result.locked_until_ms or 0
            assert time.time() * 1000 + 23 * 3_600_000 < until, until  # from the object
            assert "Object Lock retention" in result.kept_reason
            assert counting.segment_gets <= 1  # the head's manifest: no segment downloaded
            assert len(await contents(s.store)) == 5
    finally:
        s3.delete_bucket(bucket)


async def test_prune_downloads_no_segment_it_deletes(setup: LogSetup) -> None:
    await make_log(setup, 8)
    counting = CountingStore(setup.store)
    result = await prune(setup.config, counting, setup.keyring, 0.0)  # type: ignore[arg-type]
    assert result.deleted == list(range(1, 8))
    assert counting.segment_gets <= 1, counting.segment_gets  # the head's manifest at most


async def test_segments_hidden_behind_delete_markers_are_named_and_restorable(
        request: pytest.FixtureRequest, tmp_path: Path) -> None:
    s3: S3Server = request.getfixturevalue("s3")
    bucket = versioned_bucket(s3)
    try:
        async with open_setup("s3", s3_fields(request, bucket), tmp_path) as s:
            await make_log(s, 40)
            for seq in (39, 40):  # a plain DELETE in a versioned bucket: a delete marker
                await s.store.delete(s.key(seq))
            report = await verify_log(DeltaLog(s.store, LOG), keyring=s.keyring, deep=True)
            hidden = [(p.seq, p.kind) for p in report.problems]
            assert hidden == [(39, "hidden"), (40, "hidden")], report.problems
            assert s.key(39) in report.problems[0].message
            res = await asyncio.to_thread(drstream, "verify", "--config", str(s.config_path),
                                          "--deep")
            assert res.returncode == 1 and s.key(40) in res.stdout, show(res)
            # ship's restart would write 39 over the hidden one: it refuses, writes nothing
            with pytest.raises(LogStateError, match=r"segment 39 .* hidden behind a delete"):
                await LogWriter(s.store, LOG, s.keyring).open()
            # the README's restore: delete the delete markers
            for page in s3.client.get_paginator("list_object_versions").paginate(Bucket=bucket):
                for m in page.get("DeleteMarkers", []):
                    s3.client.delete_object(Bucket=bucket, Key=m["Key"], VersionId=m["VersionId"])
            report = await verify_log(DeltaLog(s.store, LOG), keyring=s.keyring, deep=True)
            assert report.ok and report.last_seq == 40, report.problems
            writer = LogWriter(s.store, LOG, s.keyring)
            await writer.open()
            assert writer.next_seq == 41
    finally:
        s3.delete_bucket(bucket)


# --------------------------------------------------------------------------- 5. fencing


async def test_create_if_absent_is_proved_before_writing(setup: LogSetup) -> None:
    await setup.store.check_create_if_absent("probe/contract-test")
    assert not [k async for k in setup.store.list("probe/")]  # removed again


async def test_an_endpoint_that_ignores_if_none_match_is_refused(
        request: pytest.FixtureRequest, tmp_path: Path) -> None:
    s3: S3Server = request.getfixturevalue("s3")
    with TcpProxy(s3.port) as proxy:
        proxy.rewrite = (b"If-None-Match:", b"X-Ignored-Hdr:")  # the server never sees it
        fields = s3_fields(request, endpoint_url=proxy.url)
        async with open_setup("s3", fields, tmp_path, **DEAD_SOURCE) as s:
            with pytest.raises(StoreError, match=r"does not honour create-if-absent"):
                await LogWriter(s.store, LOG, s.keyring).open()
            assert await contents(s.store) == {}
        res = await asyncio.to_thread(drstream, "ship", "--config", str(s.config_path),
                                      timeout=60)
    assert res.returncode == 3 and "If-None-Match" in res.stderr, show(res)


# --------------------------------------------------------------------------- 6. bounds


async def test_a_read_over_the_limit_is_refused_before_the_body(setup: LogSetup) -> None:
    key = "logs/east-1/00000000000000000001.seg"
    assert await setup.store.put_if_absent(key, os.urandom(4 << 20))
    with pytest.raises(ObjectTooLargeError, match=r"4194304 bytes, over the 65536-byte limit"):
        await setup.store.get(key, max_bytes=64 << 10)
    assert len(await setup.store.get(key, max_bytes=4 << 20) or b"") == 4 << 20


async def test_s3_does_not_download_an_object_over_the_limit(
        request: pytest.FixtureRequest, tmp_path: Path) -> None:
    s3: S3Server = request.getfixturevalue("s3")
    with TcpProxy(s3.port) as proxy:
        async with open_setup("s3", s3_fields(request, endpoint_url=proxy.url), tmp_path) as s:
            assert await s.store.put_if_absent("big", os.urandom(16 << 20))
            before = proxy.answered
            with pytest.raises(ObjectTooLargeError):
                await s.store.get("big", max_bytes=1 << 20)
            assert proxy.answered - before < 4 << 20, proxy.answered - before


async def test_a_segment_larger_than_the_format_allows_is_named(
        setup: LogSetup, monkeypatch: pytest.MonkeyPatch) -> None:
    await make_log(setup, 4)
    monkeypatch.setattr("drstream.daemon.deltalog.MAX_SEGMENT_SIZE", 2048)
    assert await setup.store.put_if_absent(setup.key(5), os.urandom(4096))
    with pytest.raises(ObjectTooLargeError, match=setup.key(5)):
        await DeltaLog(setup.store, LOG).fetch(5)
    report = await verify_log(DeltaLog(setup.store, LOG))
    assert [(p.seq, p.kind) for p in report.problems] == [(5, "unreadable")]


async def test_the_blob_limit_holds_for_a_frame_that_declares_its_size(setup: LogSetup) -> None:
    """An authentic blob whose zstd frame declares 17 MiB: zstd's max_output_size does not
    bind such a frame, the reader's own check must."""
    data = bytes(MAX_CHUNK + (1 << 20))
    bid = blob_id(data)
    salt, nonce = envelope.fresh_salt_and_nonce()
    header = b"DRB1\x01\x02k1" + salt + nonce
    key = _derive(setup.keyring.key("k1"), salt, LOG, bid)
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(data)
    raw = header + envelope.seal(key, nonce, frame, header + bid.encode())
    assert await setup.store.put_if_absent(blob_key(LOG, bid), raw)
    with pytest.raises(BlobError, match=r"declares 17825792 bytes, over the 16777216"):
        await BlobStore(setup.store, LOG, setup.keyring).get(bid)


async def test_the_file_store_refuses_links_everywhere(tmp_path: Path) -> None:
    fields = {"type": "file", "path": str(tmp_path / "store")}
    async with open_setup("file", fields, tmp_path) as s:
        await make_log(s, 3)
        root = tmp_path / "store"
        outside = tmp_path / "elsewhere.seg"
        outside.write_bytes((root / s.key(2)).read_bytes())
        (root / s.key(4)).symlink_to(outside)
        with pytest.raises(StoreError, match=r"is a symbolic link"):
            await s.store.get(s.key(4))
        with pytest.raises(StoreError, match=r"is a symbolic link"):
            await s.store.exists(s.key(4))
        assert s.key(4) in [k async for k in s.store.list("logs/")]  # seen, not skipped
        report = await verify_log(DeltaLog(s.store, LOG))
        assert [(p.seq, p.kind) for p in report.problems] == [(4, "unreadable")]
        # a linked directory: nothing below it is read or written through the link
        (root / "logs" / "west-1").symlink_to(root / "logs" / LOG, target_is_directory=True)
        with pytest.raises(StoreError, match=r"logs/west-1 is a symbolic link"):
            await s.store.get("logs/west-1/00000000000000000001.seg")
        with pytest.raises(StoreError, match=r"symbolic link"):
            await s.store.put_if_absent("logs/west-1/00000000000000000009.seg", b"x")
        assert not (root / "logs" / LOG / "00000000000000000009.seg").exists()


# --------------------------------------------------------------------------- 8. blobs


def registry_body(positions: dict[str, Any], events: list[dict[str, Any]]) -> Body:
    batches = [EventBatch("mlflow:primary", events)] if events else []
    return Body(make_manifest({"mlflow:primary": positions}, list(batches)), list(batches))


def version(n: int, chunk: str) -> dict[str, Any]:
    return {"type": "version.created", "name": "m", "version": n, "description": "",
            "tags": {}, "stage": "None", "run_id": None, "source": "s",
            "artifacts": [{"path": "model.bin", "size": 4, "sha256": "0" * 64,
                           "chunks": [chunk]}]}


async def test_prune_collects_blobs_no_remaining_segment_needs(setup: LogSetup) -> None:
    blobs = BlobStore(setup.store, LOG, setup.keyring)
    a, b = await blobs.put(b"version 1 file"), await blobs.put(b"version 2 file")
    old = await blobs.put(b"an upload no segment ever named")
    history = [
        [{"type": "model.created", "name": "m", "description": "", "tags": {}}, version(1, a)],
        [version(2, b)],
        [{"type": "version.deleted", "name": "m", "version": 1}],
        [], [],
    ]
    state, states = empty_state(), []
    writer = LogWriter(setup.store, LOG, setup.keyring)
    await writer.open()
    for events in history:
        state = fold(state, events)
        sid = await blobs.put(dump_state(state))
        states.append(sid)
        await writer.append(registry_body({"state_blob": sid, "state_digest": sid}, events))
    await writer.flush()
    await asyncio.sleep(2.5)
    fresh = await blobs.put(b"uploaded by a running ship, its segment not written yet")

    result = await prune(setup.config, setup.store, setup.keyring, 0.0, blob_grace_s=2.0)
    assert result.deleted == [1, 2, 3, 4]
    assert result.blobs is not None
    gone = {k.rsplit("/", 1)[-1] for k in result.blobs.deleted}
    # version 1's file (deleted in seq 3), the states before it, the never-named upload;
    # the state after seq 3 is the head's too (heartbeats change nothing)
    assert states[2] == states[4]
    assert gone == {a, old, *states[:2]}, (gone, a, b, old, states, fresh)
    for kept in (b, fresh, states[4]):  # the head's state, its seed's file, the fresh one
        assert await blobs.get(kept)
    for bid in gone:
        assert not await blobs.has(bid)
    report = await verify_log(DeltaLog(setup.store, LOG), keyring=setup.keyring, deep=True)
    assert report.ok, report.problems
    doc = json.loads((await setup.store.get(result.audit_object)) or b"{}")
    assert (doc["action"], doc["deleted_from_seq"], doc["deleted_through_seq"]) == \
        ("prune", 1, 4)
