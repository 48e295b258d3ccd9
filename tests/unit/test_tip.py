"""The durable-tip channel (daemon/tip.py): ship's HTTP server streams its LogWriter's
durable seq; apply's DeltaLog.follow fetches only up to it, and probes the store when the
channel is down, refused, or announces another log's tip. A real file store and writer."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from drstream.connectors.file.store import FileStore, FileStoreConfig
from drstream.daemon.codec import Body, make_manifest
from drstream.daemon.deltalog import DeltaLog, LogWriter
from drstream.daemon.keyring import KeyRing
from drstream.daemon.layout import segment_key
from drstream.daemon.metrics import Health, MetricsServer
from drstream.daemon.segment import parse_header
from drstream.daemon.store import Store
from drstream.daemon.tip import TipChannel

LOG = "east-1"


class GetCountingStore:
    """A real store that remembers every GET and what it found; not a mock."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.url = inner, inner.url
        self.gets: list[tuple[str, bool]] = []

    async def get(self, key: str, max_bytes: int | None = None) -> bytes | None:
        data = await self.inner.get(key, max_bytes)
        self.gets.append((key, data is not None))
        return data

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)


def heartbeat() -> Body:
    return Body(make_manifest({}, []), [])


@pytest.fixture
def keyring() -> KeyRing:
    return KeyRing({"k1": os.urandom(32)}, "k1")


async def open_writer(path: Path, keyring: KeyRing) -> LogWriter:
    store = FileStore(FileStoreConfig(type="file", path=str(path)))
    await store.start()
    writer = LogWriter(store, LOG, keyring)
    await writer.open()
    return writer


async def serve(writer: LogWriter) -> MetricsServer:
    server = MetricsServer("127.0.0.1:0", Health())
    server.tip = writer
    await server.start()
    return server


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def collect(store: Store, channel: TipChannel, got: list[int], prefetch: int = 1
                  ) -> None:
    """Follow the log from its start with the channel, appending each seq to `got`."""
    async for seq, _ in DeltaLog(store, LOG).follow(0, prefetch=prefetch, tip=channel,
                                                    poll_max_s=0.2):
        got.append(seq)


async def test_channel_streams_each_durable_seq_with_its_nonce(tmp_path: Path,
                                                               keyring: KeyRing) -> None:
    writer = await open_writer(tmp_path / "store", keyring)
    server = await serve(writer)
    channel = TipChannel(f"127.0.0.1:{server.port}", LOG)
    task = asyncio.create_task(channel.run())
    try:
        await until(lambda: channel.up)
        assert channel.seq == 0
        for _ in range(3):
            await writer.append(heartbeat())
        await until(lambda: channel.seq == 3)
        stored = await writer.log.fetch(3)
        assert stored is not None
        assert channel.nonce == parse_header(stored)[0].nonce.hex()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.close()


async def test_a_ship_of_another_log_is_refused(tmp_path: Path, keyring: KeyRing) -> None:
    writer = await open_writer(tmp_path / "store", keyring)
    server = await serve(writer)
    try:
        reader, w = await asyncio.open_connection("127.0.0.1", server.port)
        w.write(b"GET /tip?log_id=west-2 HTTP/1.0\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.0 409")
        w.close()
        channel = TipChannel(f"127.0.0.1:{server.port}", "west-2")
        task = asyncio.create_task(channel.run())
        await asyncio.sleep(0.5)
        assert not channel.up
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await server.close()


async def test_follow_fetches_only_up_to_the_tip_and_idles_without_gets(
        tmp_path: Path, keyring: KeyRing) -> None:
    writer = await open_writer(tmp_path / "store", keyring)
    server = await serve(writer)
    store = GetCountingStore(writer.log.store)
    channel = TipChannel(f"127.0.0.1:{server.port}", LOG)
    task = asyncio.create_task(channel.run())
    got: list[int] = []
    await until(lambda: channel.up)  # before it is up, follow probes (another test)
    follower = asyncio.create_task(collect(store, channel, got, prefetch=4))
    try:
        for i in range(12):
            await writer.append(heartbeat())
            await asyncio.sleep(0.01 * (i % 3))
        await until(lambda: got == list(range(1, 13)))
        assert all(found for _, found in store.gets), \
            f"GETs for segments that were not there: {[k for k, f in store.gets if not f]}"
        # each segment once (prefetched GETs may finish out of order)
        assert sorted(k for k, _ in store.gets) == [segment_key(LOG, s) for s in range(1, 13)]
        before = len(store.gets)
        await asyncio.sleep(1.5)  # caught up: the channel, not the store, is watched
        assert len(store.gets) == before
    finally:
        for t in (follower, task):
            t.cancel()
        await asyncio.gather(follower, task, return_exceptions=True)
        await server.close()


async def test_follow_falls_back_to_probing_when_the_channel_dies(
        tmp_path: Path, keyring: KeyRing) -> None:
    writer = await open_writer(tmp_path / "store", keyring)
    server = await serve(writer)
    channel = TipChannel(f"127.0.0.1:{server.port}", LOG)
    task = asyncio.create_task(channel.run())
    got: list[int] = []
    follower = asyncio.create_task(collect(writer.log.store, channel, got))
    try:
        await until(lambda: channel.up)
        for _ in range(3):
            await writer.append(heartbeat())
        await until(lambda: len(got) == 3)
        await server.close()  # ship's side of the channel goes away mid-stream
        await until(lambda: not channel.up)
        for _ in range(3):
            await writer.append(heartbeat())
        await until(lambda: len(got) == 6)
        assert got == [1, 2, 3, 4, 5, 6]
        assert not channel.up
    finally:
        for t in (follower, task):
            t.cancel()
        await asyncio.gather(follower, task, return_exceptions=True)


async def test_a_tip_of_a_same_named_log_elsewhere_is_not_trusted(
        tmp_path: Path, keyring: KeyRing) -> None:
    """A ship of another log with the same log_id (another store) on the address: its tip
    is behind ours and names other segments; apply stops trusting it and probes."""
    ours = await open_writer(tmp_path / "ours", keyring)
    theirs = await open_writer(tmp_path / "theirs", keyring)
    for _ in range(5):
        await ours.append(heartbeat())
    await theirs.append(heartbeat())
    await ours.flush()
    await theirs.flush()
    server = await serve(theirs)
    channel = TipChannel(f"127.0.0.1:{server.port}", LOG)
    task = asyncio.create_task(channel.run())
    got: list[int] = []
    try:
        await until(lambda: channel.up)
        follower = asyncio.create_task(collect(ours.log.store, channel, got))
        await until(lambda: len(got) == 5, timeout=5)  # not paced by the foreign tip
        assert not channel.up
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.close()
