"""A log whose seq 1 never landed is not a pruned log.

A writer killed while seq 1's upload waits for a retry can leave seqs 2.. stored behind
the hole, each written before anything was durable. Taken for a pruned log (oldest stored
segment first), the next writer would resume after them and apply would start at seq 2:
the records of seq 1 would be lost for good. Instead the next writer removes those
leftovers and begins at seq 1, apply waits for seq 1, and prune never leaves such a
segment first. A real file store and writer; seq 1's upload is held, then cancelled.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, Literal

import pytest

from drstream.connectors import file as file_connector
from drstream.connectors.file.store import FileStore, FileStoreConfig
from drstream.daemon.applier import Applier
from drstream.daemon.codec import Body, make_manifest
from drstream.daemon.config import parse_config
from drstream.daemon.deltalog import DeltaLog, LogWriter
from drstream.daemon.keyring import KeyRing
from drstream.daemon.layout import segment_key
from drstream.daemon.plugins import Connector, ConnectorConfig, Connectors, Context, SinkType
from drstream.daemon.prune import prune
from drstream.daemon.replay import DryRunSink

LOG = "east-1"


class NullSinkConfig(ConnectorConfig):
    type: Literal["null"]


class NullSink(DryRunSink):
    def __init__(self, config: NullSinkConfig, ctx: Context) -> None:
        super().__init__()
        self.name = "null:standby"


REGISTRY = Connectors([file_connector.CONNECTOR, Connector(
    name="null", sink=SinkType("null", NullSinkConfig, NullSink))])


def config(tmp_path: Path, sinks: list[dict[str, Any]]) -> Any:
    return parse_config({
        "log_id": LOG, "store": {"type": "file", "path": str(tmp_path / "store")},
        "keyring": {"active": "k1", "keys": {"k1": "env:UNUSED"}},  # keys given apart
        "sinks": sinks,
        "service": {"ship_metrics_listen": None, "apply_metrics_listen": None},
    }, connectors=REGISTRY)


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    s = FileStore(FileStoreConfig(type="file", path=str(tmp_path / "store")))
    await s.start()
    yield s
    await s.close()


@pytest.fixture
def keyring() -> KeyRing:
    return KeyRing({"k1": os.urandom(32)}, "k1")


def body(n: int) -> Body:
    return Body(make_manifest({"kafka:primary": {"t": {"0": n}}}, []), [])


async def stored(store: FileStore) -> list[int]:
    return [s for s in range(1, 10) if await store.exists(segment_key(LOG, s))]


async def write_with_seq_one_held(store: FileStore, keyring: KeyRing, n: int,
                                  monkeypatch: pytest.MonkeyPatch, *, land: bool) -> None:
    """Append seqs 1..n while seq 1's upload is held: 2..n land first, written before
    anything was durable. land=False: the writer dies with seq 1 never stored (its upload
    cancelled, as kill -9 would leave it); land=True: seq 1 lands late."""
    held, real = asyncio.Event(), store.put_if_absent

    async def put(key: str, data: bytes) -> bool:
        if key == segment_key(LOG, 1):
            await held.wait()
        return await real(key, data)

    monkeypatch.setattr(store, "put_if_absent", put)
    writer = LogWriter(store, LOG, keyring)
    await writer.open()
    for i in range(n):
        await writer.append(body(i))
    while await stored(store) != list(range(2, n + 1)):
        await asyncio.sleep(0.01)
    if land:
        held.set()
        await writer.flush()
    await writer.close()
    monkeypatch.setattr(store, "put_if_absent", real)


async def test_the_next_writer_removes_what_was_behind_a_lost_seq_one(
        store: FileStore, keyring: KeyRing, monkeypatch: pytest.MonkeyPatch) -> None:
    await write_with_seq_one_held(store, keyring, 3, monkeypatch, land=False)
    assert await stored(store) == [2, 3]
    assert await DeltaLog(store, LOG, keyring).log_start() == 1
    writer = LogWriter(store, LOG, keyring)
    assert await writer.open() is None, "resumed from a segment behind the lost seq 1"
    assert writer.next_seq == 1
    assert await stored(store) == []
    await writer.append(body(0))
    await writer.flush()
    assert await stored(store) == [1]


async def test_apply_waits_for_seq_one_instead_of_taking_the_log_for_pruned(
        tmp_path: Path, store: FileStore, keyring: KeyRing,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await write_with_seq_one_held(store, keyring, 3, monkeypatch, land=False)
    applier = Applier(config(tmp_path, [{"type": "null"}]), store, keyring)
    assert await applier.start() == 0


async def test_prune_never_leaves_a_segment_written_before_seq_one_was_durable_first(
        tmp_path: Path, store: FileStore, keyring: KeyRing,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await write_with_seq_one_held(store, keyring, 3, monkeypatch, land=True)
    assert await stored(store) == [1, 2, 3]
    result = await prune(config(tmp_path, []), store, keyring, older_than_s=0)
    assert result.deleted == [], result
    assert "before seq 1 was durable" in result.kept_reason
    assert await stored(store) == [1, 2, 3]


async def test_a_pruned_log_still_starts_at_its_oldest_segment(
        store: FileStore, keyring: KeyRing) -> None:
    writer = LogWriter(store, LOG, keyring, max_in_flight=1)
    await writer.open()
    for i in range(4):
        await writer.append(body(i))
    await writer.flush()
    await writer.close()
    for seq in (1, 2):
        await store.delete(segment_key(LOG, seq))
    assert await DeltaLog(store, LOG, keyring).log_start() == 3
    reopened = LogWriter(store, LOG, keyring)
    manifest = await reopened.open()
    assert manifest is not None and reopened.next_seq == 5
