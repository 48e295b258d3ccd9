"""apply opens the next group of segments while the sink writes the one before.

For a sink that takes records in produce() form (the Kafka sink), opening a group (MAC,
decrypt, decode) runs on a worker thread while the sink's own thread writes the group
before it. Here the sink holds its first write until apply has opened a later segment:
without the overlap that never happens and the write reports it. The chain is still
checked across the groups, and a damaged segment still stops apply after everything
before it is written, naming the segment.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any, Literal

import pytest

from drstream.connectors import file as file_connector
from drstream.connectors.file import store as file_store
from drstream.daemon.applier import Applier
from drstream.daemon.codec import Body, make_manifest
from drstream.daemon.config import parse_config
from drstream.daemon.deltalog import LogWriter
from drstream.daemon.errors import DrstreamError
from drstream.daemon.keyring import KeyRing
from drstream.daemon.layout import segment_key
from drstream.daemon.plugins import Connector, ConnectorConfig, Connectors, Context, SinkType
from drstream.daemon.records import AppliedSegment
from drstream.daemon.replay import DryRunSink

LOG = "east-1"
SEGMENTS = 12
HOLD_S = 10.0  # how long the first write waits to see a later segment opened


class FormSinkConfig(ConnectorConfig):
    type: Literal["form"]
    name: str = "standby"


class FormSink(DryRunSink):
    """Takes segments in produce() form (no system behind it); its first write waits,
    on its own thread, until apply has opened a segment after that write's group."""

    produce_form: tuple[tuple[tuple[str, bytes], ...], str | None] = ((), None)

    def __init__(self, config: FormSinkConfig, ctx: Context) -> None:
        super().__init__()
        self.name = f"form:{config.name}"
        self.groups: list[list[int]] = []
        self.opened_beyond = threading.Event()
        self.watch_beyond: int | None = None
        self.overlapped: bool | None = None

    async def apply(self, seq: int, digest: bytes, created_at_ms: int, body: Body) -> None:
        await self.apply_batch([AppliedSegment(seq, digest, created_at_ms, body, 0)])

    async def apply_batch(self, segments: list[AppliedSegment]) -> None:
        await asyncio.to_thread(self._write, [s.seq for s in segments])
        last = segments[-1]
        await super().apply(last.seq, last.digest, last.created_at_ms, last.body)

    def _write(self, seqs: list[int]) -> None:
        self.groups.append(seqs)
        if self.overlapped is None:
            self.watch_beyond = seqs[-1]
            self.overlapped = self.opened_beyond.wait(HOLD_S)


REGISTRY = Connectors([file_connector.CONNECTOR, Connector(
    name="form", sink=SinkType("form", FormSinkConfig, FormSink))])


class WatchedApplier(Applier):
    """Tells the sink when a segment beyond its held write's group has been opened."""

    def _open_with(self, segments: Any, *form: Any) -> Any:
        opened = super()._open_with(segments, *form)
        sink = self.sinks[0]
        assert isinstance(sink, FormSink)
        if sink.watch_beyond is not None and any(s.seq > sink.watch_beyond
                                                 for s in opened[0]):
            sink.opened_beyond.set()
        return opened


async def write_log(tmp_path: Path, keyring: KeyRing) -> file_store.FileStore:
    store = file_store.FileStore(file_store.FileStoreConfig(type="file",
                                                           path=str(tmp_path / "store")))
    await store.start()
    writer = LogWriter(store, LOG, keyring)
    await writer.open()
    for _ in range(SEGMENTS):
        await writer.append(Body(make_manifest({}, []), []))
        await writer.flush()
    await writer.close()
    return store


async def apply_all(tmp_path: Path, store: file_store.FileStore, keyring: KeyRing
                    ) -> tuple[WatchedApplier, FormSink, BaseException | None]:
    config = parse_config({
        "log_id": LOG, "store": {"type": "file", "path": str(tmp_path / "store")},
        "keyring": {"active": "k1", "keys": {"k1": "env:UNUSED"}},  # keys given apart
        "sinks": [{"type": "form"}],
        "apply": {"poll_max_s": 0.05, "tip_from": None, "batch_max_segments": 4},
        "service": {"ship_metrics_listen": None, "apply_metrics_listen": None},
    }, connectors=REGISTRY)
    applier = WatchedApplier(config, store, keyring)
    sink = applier.sinks[0]
    assert isinstance(sink, FormSink)
    error: BaseException | None = None
    try:
        await asyncio.wait_for(applier.run(asyncio.Event(), until_seq=SEGMENTS), 60)
    except DrstreamError as e:
        error = e
    return applier, sink, error


@pytest.fixture
def keyring() -> KeyRing:
    return KeyRing({"k1": os.urandom(32)}, "k1")


async def test_the_next_group_is_opened_while_the_sink_writes(
        tmp_path: Path, keyring: KeyRing) -> None:
    store = await write_log(tmp_path, keyring)
    applier, sink, error = await apply_all(tmp_path, store, keyring)
    assert error is None, error
    assert sink.overlapped, "no later segment was opened while the first group was written"
    assert [seq for group in sink.groups for seq in group] == list(range(1, SEGMENTS + 1))
    assert max(len(g) for g in sink.groups) <= 4  # apply.batch_max_segments holds
    assert applier.progress.applied_seq == SEGMENTS


@pytest.mark.parametrize("damage", ["ciphertext", "swap"])
async def test_a_damaged_segment_stops_apply_after_the_ones_before_it(
        tmp_path: Path, keyring: KeyRing, damage: str) -> None:
    store = await write_log(tmp_path, keyring)
    bad = 7
    path = tmp_path / "store" / segment_key(LOG, bad)
    if damage == "ciphertext":
        data = bytearray(path.read_bytes())
        data[-5] ^= 1
        path.write_bytes(bytes(data))
    else:  # a segment of another place in the chain, under seq `bad`'s name: a broken link
        other = (tmp_path / "store" / segment_key(LOG, bad + 2)).read_bytes()
        path.write_bytes(other)
    applier, sink, error = await apply_all(tmp_path, store, keyring)
    assert error is not None and f"seq {bad} object {segment_key(LOG, bad)}" in str(error), error
    assert [seq for group in sink.groups for seq in group] == list(range(1, bad))
    assert applier.progress.applied_seq == bad - 1
