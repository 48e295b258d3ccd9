"""`verify` over every store: a clean log passes; every kind of damage is named by seq."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from drstream.daemon.deltalog import DeltaLog, LogWriter, segment_key
from drstream.daemon.keyring import KeyRing, generate_key_file, load_key
from drstream.daemon.store import Store
from drstream.daemon.verify import Report, verify_log
from tests.contract.test_deltalog_contract import LOG, body


@pytest.fixture
def keyring() -> KeyRing:
    return KeyRing({"k1": os.urandom(32)}, "k1")


async def make_log(store: Store, keyring: KeyRing, n: int = 6) -> None:
    writer = LogWriter(store, LOG, keyring)
    await writer.open()
    for i in range(n):
        await writer.append(body(4, start=4 * i))
    await writer.flush()


async def replace(store: Store, seq: int, data: bytes) -> None:
    await store.delete(segment_key(LOG, seq))
    assert await store.put_if_absent(segment_key(LOG, seq), data)


async def run(store: Store, keyring: KeyRing | None, deep: bool) -> Report:
    return await verify_log(DeltaLog(store, LOG), keyring=keyring, deep=deep)


def kinds(report: Report) -> list[tuple[int | None, str]]:
    return [(p.seq, p.kind) for p in report.problems]


async def test_clean_log_passes_shallow_and_deep(store: Store, keyring: KeyRing) -> None:
    await make_log(store, keyring)
    shallow, deep = await run(store, None, False), await run(store, keyring, True)
    assert shallow.ok and deep.ok
    assert (deep.segments, deep.records, deep.key_ids) == (6, 24, {"k1"})
    assert deep.first_seq == 1 and deep.last_seq == 6


async def test_missing_segment_is_a_gap(store: Store, keyring: KeyRing) -> None:
    await make_log(store, keyring)
    await store.delete(segment_key(LOG, 3))
    report = await run(store, None, False)
    assert kinds(report) == [(3, "gap")]


async def test_flipped_byte_breaks_link_and_mac(store: Store, keyring: KeyRing) -> None:
    await make_log(store, keyring)
    data = bytearray(await store.get(segment_key(LOG, 4)) or b"")
    data[-5] ^= 0x01
    await replace(store, 4, bytes(data))
    assert kinds(await run(store, None, False)) == [(5, "chain")]
    assert kinds(await run(store, keyring, True)) == [(4, "auth"), (5, "chain")]


async def test_segment_moved_to_another_seq(store: Store, keyring: KeyRing) -> None:
    await make_log(store, keyring)
    await replace(store, 3, await store.get(segment_key(LOG, 2)) or b"")
    report = await run(store, keyring, True)
    assert (3, "moved") in kinds(report)


async def test_unknown_key_and_wrong_key(store: Store, keyring: KeyRing) -> None:
    await make_log(store, keyring)
    other = KeyRing({"k9": os.urandom(32)}, "k9")
    assert {k for _, k in kinds(await run(store, other, True))} == {"key"}
    wrong = KeyRing({"k1": os.urandom(32)}, "k1")
    assert kinds(await run(store, wrong, True)) == [(s, "auth") for s in range(1, 7)]


async def test_truncated_segment(store: Store, keyring: KeyRing) -> None:
    await make_log(store, keyring)
    data = await store.get(segment_key(LOG, 6)) or b""
    await replace(store, 6, data[: len(data) // 2])
    assert kinds(await run(store, None, False)) == [(6, "format")]


async def test_cli_verify_exit_codes(tmp_path: Path) -> None:
    from drstream.connectors.file.store import FileStore, FileStoreConfig

    key_path = tmp_path / "k1.key"
    generate_key_file(key_path)
    keyring = KeyRing({"k1": load_key(f"file:{key_path}")}, "k1")
    root = tmp_path / "log"
    async with FileStore(FileStoreConfig(type="file", path=str(root))) as store:
        await make_log(store, keyring)

    def verify(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "drstream.daemon.cli", "verify", f"file://{root}", *extra],
            capture_output=True, text=True, timeout=60,
        )

    ok = verify("--deep", "--key", f"k1=file:{key_path}")
    assert ok.returncode == 0, ok.stderr
    assert "records    24" in ok.stdout and "OK" in ok.stdout
    seg = root / segment_key(LOG, 2)
    raw = bytearray(seg.read_bytes())
    raw[-1] ^= 0x80
    seg.write_bytes(bytes(raw))
    bad = verify("--deep", "--key", f"k1=file:{key_path}")
    assert bad.returncode == 1
    assert f"{LOG} seq 2: auth" in bad.stdout
    no_key = verify("--deep")  # a usage error naming the option, never a runtime failure
    assert no_key.returncode == 2 and "--deep" in no_key.stderr and "--key" in no_key.stderr


async def test_deep_checks_every_blob_a_segment_names(store: Store, keyring: KeyRing) -> None:
    """Registry logs name blobs (state snapshots, file chunks): deep verify fetches and
    authenticates each one and names the segment and the object of a missing or bad one."""
    from drstream.daemon.blobs import BlobStore
    from drstream.daemon.codec import Body, EventBatch, make_manifest

    blobs = BlobStore(store, LOG, keyring)
    state, chunk, gone = (await blobs.put(b"state"), await blobs.put(b"chunk" * 1000),
                          await blobs.put(b"gone"))
    writer = LogWriter(store, LOG, keyring)
    await writer.open()
    for refs in ([chunk], [gone]):
        event = {"type": "version.created", "artifacts": [{"path": "m/w.bin", "chunks": refs}]}
        batches: list[Any] = [EventBatch("mlflow:primary", [event])]
        positions = {"mlflow:primary": {"state_blob": state}}
        await writer.append(Body(make_manifest(positions, batches), batches))
    await writer.flush()
    clean = await run(store, keyring, True)
    assert clean.ok and clean.blobs_checked == 3
    await store.delete(blobs.key(gone))
    raw = await store.get(blobs.key(chunk))
    assert raw is not None
    await store.delete(blobs.key(chunk))
    await store.put_if_absent(blobs.key(chunk), raw[:-1] + bytes([raw[-1] ^ 1]))
    report = await run(store, keyring, True)
    assert sorted(kinds(report)) == [(1, "blob"), (2, "blob")]
    text = " ".join(str(p) for p in report.problems)
    assert blobs.key(gone) in text and "missing" in text
    assert blobs.key(chunk) in text and "authentication failed" in text
