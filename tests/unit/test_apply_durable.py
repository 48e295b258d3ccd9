"""apply never applies a segment its writer has not finished making durable.

The file store makes a segment visible with link() before the directory fsync that makes
the link survive a power loss. Here the writer is held exactly there (linked, directory
not yet fsynced) for one segment, and the applier runs against the same directory:
- with ship's durable-tip channel, apply does not even read that segment until the
  writer is done;
- probing without the channel, apply may read it, but the store's read fsyncs the
  directory first, so what apply applies is durable before it is applied.
A real file store, writer and applier; the sink records what it was given.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from drstream.connectors import file as file_connector
from drstream.connectors.file import store as file_store
from drstream.daemon.applier import Applier
from drstream.daemon.codec import Body, make_manifest
from drstream.daemon.config import parse_config
from drstream.daemon.deltalog import LogWriter
from drstream.daemon.keyring import KeyRing
from drstream.daemon.layout import segment_key
from drstream.daemon.metrics import Health, MetricsServer
from drstream.daemon.plugins import (
    Connector,
    ConnectorConfig,
    Connectors,
    Context,
    SinkType,
)
from drstream.daemon.replay import DryRunSink

LOG = "east-1"
HELD = 3  # the segment whose writer is held between link and directory fsync


class RecordSinkConfig(ConnectorConfig):
    type: Literal["record"]
    name: str = "standby"


class RecordSink(DryRunSink):
    """Keeps the seqs it was asked to apply, with the time (a test sink, no system)."""

    def __init__(self, config: RecordSinkConfig, ctx: Context) -> None:
        super().__init__()
        self.name = f"record:{config.name}"
        self.applied: list[tuple[int, float]] = []

    async def apply(self, seq: int, digest: bytes, created_at_ms: int, body: Body) -> None:
        self.applied.append((seq, time.monotonic()))
        await super().apply(seq, digest, created_at_ms, body)


REGISTRY = Connectors([file_connector.CONNECTOR, Connector(
    name="record", sink=SinkType("record", RecordSinkConfig, RecordSink))])


@dataclass
class DiskEvents:
    """The held writer and every directory fsync of the segments' directory, in order."""

    release: threading.Event = field(default_factory=threading.Event)
    events: list[tuple[str, float]] = field(default_factory=list)  # (what, monotonic)

    def first(self, what: str) -> float | None:
        return next((t for w, t in self.events if w == what), None)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[DiskEvents]:
    """Holds the writer of segment HELD after its link, before its directory fsync, until
    `release`; records each fsync of a directory (whoever calls it) as it completes."""
    d = DiskEvents()
    local = threading.local()
    real_put, real_fsync = file_store.FileStore._put_sync, os.fsync

    def put(self: Any, key: str, *args: Any) -> bool:
        local.key = key
        try:
            return bool(real_put(self, key, *args))
        finally:
            local.key = None

    def fsync(fd: int) -> None:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            real_fsync(fd)
            return
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        if getattr(local, "key", None) == segment_key(LOG, HELD):
            d.events.append(("writer linked", time.monotonic()))
            assert d.release.wait(30), "the held writer was never released"
            real_fsync(fd)
            d.events.append(("writer fsynced", time.monotonic()))
            return
        real_fsync(fd)
        d.events.append((f"fsync {name}", time.monotonic()))

    monkeypatch.setattr(file_store.FileStore, "_put_sync", put)
    monkeypatch.setattr(os, "fsync", fsync)
    yield d
    d.release.set()


def config(tmp_path: Path, tip_from: str | None) -> Any:
    return parse_config({
        "log_id": LOG, "store": {"type": "file", "path": str(tmp_path / "store")},
        "keyring": {"active": "k1", "keys": {"k1": "env:UNUSED"}},  # keys given apart
        "sinks": [{"type": "record"}],
        "apply": {"poll_max_s": 0.05, "tip_from": tip_from},
        "service": {"ship_metrics_listen": None, "apply_metrics_listen": None},
    }, connectors=REGISTRY)


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def run_case(tmp_path: Path, disk: DiskEvents, with_tip: bool) -> RecordSink:
    keyring = KeyRing({"k1": os.urandom(32)}, "k1")
    store = file_store.FileStore(file_store.FileStoreConfig(type="file",
                                                           path=str(tmp_path / "store")))
    await store.start()
    writer = LogWriter(store, LOG, keyring)
    await writer.open()
    server = None
    tip_from = None
    if with_tip:
        server = MetricsServer("127.0.0.1:0", Health())
        server.tip = writer
        await server.start()
        tip_from = f"127.0.0.1:{server.port}"
    applier = Applier(config(tmp_path, tip_from), store, keyring, tip_channel=with_tip)
    sink = applier.sinks[0]
    assert isinstance(sink, RecordSink)
    stop = asyncio.Event()
    task = asyncio.create_task(applier.run(stop))
    try:
        if applier.tip is not None:
            tip = applier.tip
            await until(lambda: tip.up)
        for _ in range(HELD - 1):
            await writer.append(Body(make_manifest({}, []), []))
        await writer.flush()  # no other writer's directory fsync lands after the held link
        await writer.append(Body(make_manifest({}, []), []))
        await until(lambda: disk.first("writer linked") is not None)
        await until(lambda: len(sink.applied) >= HELD - 1)
        if with_tip:
            await asyncio.sleep(1.0)  # time enough to apply it, were it fetched
            assert [s for s, _ in sink.applied] == list(range(1, HELD)), \
                "applied a segment before its writer made it durable"
            disk.release.set()
        await until(lambda: len(sink.applied) == HELD)
        disk.release.set()
        await writer.flush()
        return sink
    finally:
        disk.release.set()
        stop.set()
        await asyncio.wait_for(task, 10)
        if server is not None:
            await server.close()
        await writer.close()


async def test_with_the_tip_channel_a_segment_waits_for_its_writer(
        tmp_path: Path, disk: DiskEvents) -> None:
    sink = await run_case(tmp_path, disk, with_tip=True)
    applied_at = dict(sink.applied)[HELD]
    fsynced = disk.first("writer fsynced")
    assert fsynced is not None and fsynced <= applied_at


async def test_probing_apply_makes_what_it_reads_durable_before_applying(
        tmp_path: Path, disk: DiskEvents) -> None:
    sink = await run_case(tmp_path, disk, with_tip=False)
    linked, applied_at = disk.first("writer linked"), dict(sink.applied)[HELD]
    assert linked is not None
    segment_dir = Path(segment_key(LOG, HELD)).parent.name
    durable = [t for w, t in disk.events if w == f"fsync {segment_dir}" and linked <= t]
    assert durable and durable[0] <= applied_at, (
        f"segment {HELD} applied at {applied_at:.3f} without a directory fsync after its "
        f"link at {linked:.3f}: {disk.events}")
    writer_done = disk.first("writer fsynced")
    assert writer_done is None or writer_done > applied_at  # the writer was still held
