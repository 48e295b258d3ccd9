"""The delta log over every store: append, durable head, resume, fencing, follow, verify."""

from __future__ import annotations

import asyncio
import os

import pytest

from drstream.daemon.codec import Body, KafkaBatch, KafkaRecord, make_manifest
from drstream.daemon.deltalog import DeltaLog, LogWriter, Tail, segment_key
from drstream.daemon.errors import FencedError
from drstream.daemon.keyring import KeyRing
from drstream.daemon.segment import decode_segment, encode_segment, parse_header, segment_digest
from drstream.daemon.store import Store
from drstream.daemon.verify import verify_log

LOG = "east-1"


@pytest.fixture
def keyring() -> KeyRing:
    return KeyRing({"k1": os.urandom(32)}, "k1")


def body(n: int, start: int = 0, topic: str = "orders") -> Body:
    records = [
        KafkaRecord(offset=start + i, timestamp=1_700_000_000_000 + i, timestamp_type=1,
                    key=f"k{i}".encode(), value=os.urandom(64), headers=[("h", b"v")])
        for i in range(n)
    ]
    batches = [KafkaBatch("kafka:primary", topic, 0, records)]
    positions = {"kafka:primary": {topic: {"0": start + n}}}
    return Body(make_manifest(positions, batches), batches)


class CountingStore:
    """Counts calls on a real store (to show O(log n) probing); not a mock."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.url, self.calls = inner, inner.url, {"exists": 0, "list": 0}

    async def exists(self, key: str) -> bool:
        self.calls["exists"] += 1
        return await self.inner.exists(key)

    def list(self, prefix: str, start_after: str | None = None, limit: int | None = None):  # type: ignore[no-untyped-def]
        self.calls["list"] += 1
        return self.inner.list(prefix, start_after=start_after, limit=limit)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)


async def write_log(store: Store, keyring: KeyRing, n: int, max_in_flight: int = 4) -> LogWriter:
    writer = LogWriter(store, LOG, keyring, max_in_flight=max_in_flight)
    assert await writer.open() is None
    for i in range(n):
        await writer.append(body(3, start=3 * i))
    await writer.flush()
    return writer


async def test_append_chains_segments_and_head_is_durable(store: Store, keyring: KeyRing) -> None:
    writer = await write_log(store, keyring, 9)
    assert writer.durable_seq == 9
    prev = bytes(32)
    for seq in range(1, 10):
        data = await store.get(segment_key(LOG, seq))
        assert data is not None
        header, _ = parse_header(data)
        assert (header.log_id, header.seq, header.prev_digest) == (LOG, seq, prev)
        _, decoded = decode_segment(data, keyring, expect_log_id=LOG, expect_seq=seq)
        assert decoded.batches[0].records[0].offset == 3 * (seq - 1)  # type: ignore[union-attr]
        prev = segment_digest(data)
    report = await verify_log(DeltaLog(store, LOG), keyring=keyring, deep=True)
    assert report.ok, report.problems
    assert (report.segments, report.records) == (9, 27)


async def test_head_found_with_logarithmic_probes(store: Store, keyring: KeyRing) -> None:
    await write_log(store, keyring, 37, max_in_flight=8)
    counting = CountingStore(store)
    assert await DeltaLog(counting, LOG).head_seq() == 37  # type: ignore[arg-type]
    assert counting.calls["exists"] <= 2 * 6 + 2  # 2*log2(37) + slack, never one per segment
    assert counting.calls["list"] == 2  # first seq + the orphan window


async def test_reopen_resumes_from_head_manifest(store: Store, keyring: KeyRing) -> None:
    await write_log(store, keyring, 5)
    writer = LogWriter(store, LOG, keyring)
    manifest = await writer.open()
    assert manifest is not None
    assert manifest.positions == {"kafka:primary": {"orders": {"0": 15}}}
    assert writer.next_seq == 6
    await writer.append(body(2, start=15))
    await writer.flush()
    report = await verify_log(DeltaLog(store, LOG), keyring=keyring, deep=True)
    assert report.ok and report.last_seq == 6


async def test_second_writer_is_fenced_naming_the_object(store: Store, keyring: KeyRing) -> None:
    await write_log(store, keyring, 2)
    first, second = LogWriter(store, LOG, keyring), LogWriter(store, LOG, keyring)
    await first.open()
    await second.open()
    await first.append(body(1, start=100))
    await first.flush()
    await second.append(body(1, start=200))
    with pytest.raises(FencedError) as info:
        await second.flush()
    assert segment_key(LOG, 3) in str(info.value)
    with pytest.raises(FencedError):  # the fenced writer stays stopped
        await second.append(body(1, start=300))
    data = await store.get(segment_key(LOG, 3))
    assert data is not None
    _, decoded = decode_segment(data, keyring, expect_log_id=LOG, expect_seq=3)
    assert decoded.batches[0].records[0].offset == 100  # type: ignore[union-attr]


async def test_retry_of_own_upload_is_not_fencing(store: Store, keyring: KeyRing) -> None:
    writer = LogWriter(store, LOG, keyring)
    await writer.open()
    await writer.append(body(1))
    await writer.flush()
    data = await store.get(segment_key(LOG, 1))
    assert data is not None
    await writer._put_once(segment_key(LOG, 1), data)  # the reply of a put was lost
    with pytest.raises(FencedError):
        await writer._put_once(segment_key(LOG, 1), data + b"x")


async def test_orphans_behind_a_hole_are_not_the_head(store: Store, keyring: KeyRing) -> None:
    await write_log(store, keyring, 10)
    # a writer killed with uploads in flight: 11 never landed, 12 and 13 did
    prev = segment_digest(await store.get(segment_key(LOG, 10)) or b"")
    for seq in (11, 12, 13):
        data = encode_segment(body(1, start=30 + seq), log_id=LOG, seq=seq, prev_digest=prev,
                              keyring=keyring)
        prev = segment_digest(data)
        if seq != 11:
            await store.put_if_absent(segment_key(LOG, seq), data)
    log = DeltaLog(store, LOG)
    assert await log.locate() == Tail(1, 10, (12, 13))
    writer = LogWriter(store, LOG, keyring)
    assert (await writer.open()) is not None
    assert writer.next_seq == 11
    assert not await store.exists(segment_key(LOG, 12))
    for i in range(3):
        await writer.append(body(1, start=30 + i))
    await writer.flush()
    report = await verify_log(log, keyring=keyring, deep=True)
    assert report.ok, report.problems


async def test_durable_head_never_skips_a_slow_upload(store: Store, keyring: KeyRing) -> None:
    gate = asyncio.Event()

    class SlowFirst:
        def __init__(self) -> None:
            self.url = store.url

        async def put_if_absent(self, key: str, data: bytes) -> bool:
            if key.endswith(f"{2:020d}.seg"):
                await gate.wait()
            return await store.put_if_absent(key, data)

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(store, name)

    writer = LogWriter(SlowFirst(), LOG, keyring, max_in_flight=4)  # type: ignore[arg-type]
    await writer.open()
    for i in range(4):
        await writer.append(body(1, start=i))
    for _ in range(200):
        if await store.exists(segment_key(LOG, 4)):
            break
        await asyncio.sleep(0.02)
    assert await store.exists(segment_key(LOG, 4))
    assert writer.durable_seq == 1  # 3 and 4 are stored, 2 is not: the head waits
    gate.set()
    await writer.wait_durable(4)
    assert writer.durable_seq == 4


async def test_follow_sees_new_segments(store: Store, keyring: KeyRing) -> None:
    await write_log(store, keyring, 2)
    log, stop, seen = DeltaLog(store, LOG), asyncio.Event(), []

    async def follower() -> None:
        async for seq, data in log.follow(0, stop):
            seen.append((seq, parse_header(data)[0].seq))
            if seq == 4:
                stop.set()

    task = asyncio.create_task(follower())
    writer = LogWriter(store, LOG, keyring)
    await writer.open()
    await asyncio.sleep(0.2)
    await writer.append(body(1, start=6))
    await writer.append(body(1, start=7))
    await writer.flush()
    await asyncio.wait_for(task, 20)
    assert seen == [(1, 1), (2, 2), (3, 3), (4, 4)]
