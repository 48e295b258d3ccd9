"""status and verify against a running system: the log's head is read before the sinks'
checkpoints, so a checkpoint past that head is only reported as a truncated log when the
log, read again, still ends before it (ship and apply both moved on in between)."""

from __future__ import annotations

import os
from pathlib import Path

from drstream.connectors.file import store as file_store
from drstream.daemon.codec import Body, make_manifest
from drstream.daemon.config import parse_config
from drstream.daemon.deltalog import DeltaLog, LogWriter
from drstream.daemon.keyring import KeyRing
from drstream.daemon.records import Checkpoint
from drstream.daemon.segment import segment_digest
from drstream.daemon.status import LogHead, log_findings

LOG = "east-1"


async def test_a_checkpoint_past_a_head_read_earlier_is_not_a_truncation(tmp_path: Path) -> None:
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
