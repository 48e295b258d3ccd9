"""status and verify against a running system: the log's head is read before the sinks'
checkpoints, so a checkpoint past that head is only reported as a truncated log when the
log, read again, still ends before it (ship and apply both moved on in between)."""

from __future__ import annotations

import os
from pathlib import Path

from drstream.connectors.file import store as file_store
from drstream.connectors.file.store import FileStore
from drstream.daemon.codec import Body, make_manifest
from drstream.daemon.config import Config, parse_config
from drstream.daemon.deltalog import DeltaLog, LogWriter
from drstream.daemon.keyring import KeyRing
from drstream.daemon.records import Checkpoint
from drstream.daemon.segment import segment_digest
from drstream.daemon.status import LogHead, log_findings

LOG = "east-1"


async def six_segments(tmp_path: Path) -> tuple[Config, DeltaLog, FileStore, KeyRing]:
    """A file store holding log LOG of six heartbeat segments, and a config naming it."""
    keyring = KeyRing({"k1": os.urandom(32)}, "k1")
    fields = {"type": "file", "path": str(tmp_path / "store")}
    store = file_store.FileStore(file_store.FileStoreConfig(**fields))
    await store.start()
    writer = LogWriter(store, LOG, keyring)
    await writer.open()
    for _ in range(6):
        await writer.append(Body(make_manifest({}, []), []))
        await writer.flush()
    await writer.close()
    config = parse_config({"log_id": LOG, "store": fields,
                           "keyring": {"active": "k1", "keys": {"k1": "env:UNUSED"}}})
    log = DeltaLog(store, LOG, keyring)
    return config, log, store, keyring


async def test_a_checkpoint_past_a_head_read_earlier_is_not_a_truncation(tmp_path: Path) -> None:
    config, log, store, _ = await six_segments(tmp_path)
    seg6 = await log.fetch(6)
    assert seg6 is not None
    applied = {"kafka:standby": Checkpoint(seq=6, digest=segment_digest(seg6))}
    read_before = LogHead(seq=5)  # the head as read before segment 6 was written

    problems, _ = await log_findings(config, log, read_before, applied)
    assert problems == []

    await store.delete(log.key(6))  # now the log really ends before what was applied
    problems, _ = await log_findings(config, log, read_before, applied)
    assert len(problems) == 1 and problems[0].startswith(
        "truncated: sink kafka:standby applied through seq 6 but the log ends at 5"), problems


async def test_a_next_segment_that_fails_its_mac_is_named_with_the_sink_it_stops(
        tmp_path: Path) -> None:
    """status reads the one segment each sink applies next: tampered, or under a key the
    key ring does not hold, it is a problem naming the segment and where the sink stops."""
    config, log, store, keyring = await six_segments(tmp_path)
    applied = {"kafka:standby": Checkpoint(seq=3)}
    problems, _ = await log_findings(config, log, LogHead(seq=6), applied, keyring)
    assert problems == []

    data = bytearray(await log.fetch(4) or b"")
    data[-20] ^= 0x01  # inside the ciphertext or its tag: the MAC fails either way
    await store.delete(log.key(4))
    assert await store.put_if_absent(log.key(4), bytes(data))
    problems, _ = await log_findings(config, log, LogHead(seq=6), applied, keyring)
    assert len(problems) == 1 and problems[0].startswith(
        f"damaged: segment log {LOG} seq 4 object {log.key(4)}: "), problems
    assert problems[0].endswith("sink kafka:standby cannot apply past seq 3"), problems
    # verify reads every segment itself and passes no key ring: no second finding
    assert (await log_findings(config, log, LogHead(seq=6), applied))[0] == []
    # a sink that applied past it is not stopped by it
    ahead = {"kafka:standby": Checkpoint(seq=4)}
    assert (await log_findings(config, log, LogHead(seq=6), ahead, keyring))[0] == []
    other = KeyRing({"k2": os.urandom(32)}, "k2")  # another deployment's key only
    problems, _ = await log_findings(config, log, LogHead(seq=6), ahead, other)
    assert len(problems) == 1 and "seq 5" in problems[0] and "k1" in problems[0], problems
