"""The log is never destroyed by its own writer, and never read as a shorter good log.

Each test builds a 40-segment log in a real store (the file store, the moto S3 server,
fake-gcs-server and Azurite), changes it as an operator or an attacker would, and then
runs what a region rebuilds with: the delta log's readers, the writer's open (what `ship`
does at a restart), and the `drstream` commands `replay --dry-run`, `status`, `verify`,
`ship`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from drstream.daemon.deltalog import GAP_CHECK_AFTER_S, DeltaLog, LogWriter
from drstream.daemon.errors import ChainError, LogGapError, LogStateError, SegmentFormatError
from drstream.daemon.plan import ReplayPlan
from drstream.daemon.replay import replay
from drstream.daemon.segment import encode_segment, segment_digest
from drstream.daemon.status import status
from drstream.daemon.store import Store
from drstream.daemon.verify import verify_log
from tests.contract.integrity import (
    DEAD_SOURCE,
    LOG,
    STREAM,
    LogSetup,
    contents,
    flip,
    make_log,
    param_setup,
    prev_digest_offset,
    rename,
    replace,
)
from tests.contract.test_deltalog_contract import body
from tests.support.procs import drstream, show


@pytest.fixture(params=["file", "s3", "gcs", "azure"])
async def setup(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LogSetup]:
    async with param_setup(request, tmp_path) as s:
        await make_log(s)
        yield s


def dry_run() -> ReplayPlan:
    return ReplayPlan(stream=STREAM, dry_run=True)


# --------------------------------------------------------------------------- 1. gaps


async def test_a_missing_middle_segment_is_a_gap_to_every_reader(setup: LogSetup) -> None:
    await setup.store.delete(setup.key(20))
    before = await contents(setup.store)

    with pytest.raises(LogGapError) as gap:
        await DeltaLog(setup.store, LOG, setup.keyring).end()
    assert gap.value.missing == [20] and setup.key(20) in str(gap.value)
    with pytest.raises(LogGapError, match="seq 20"):
        await replay(setup.config, setup.store, setup.keyring, dry_run())
    with pytest.raises(LogGapError, match="seq 20"):
        await status(setup.config, setup.store, setup.keyring)
    report = await verify_log(DeltaLog(setup.store, LOG))
    assert [(p.seq, p.kind) for p in report.problems] == [(20, "gap")]

    # the writer's restart: neither 21..40 deleted nor 20 written again
    with pytest.raises(LogStateError) as stuck:
        await LogWriter(setup.store, LOG, setup.keyring).open()
    assert "seq 20 missing" in str(stuck.value) and setup.key(21) in str(stuck.value)
    assert "log truncate" in str(stuck.value)
    assert await contents(setup.store) == before


async def test_a_follower_stops_at_a_gap_instead_of_waiting_for_it(setup: LogSetup) -> None:
    await setup.store.delete(setup.key(20))
    seen = []
    with pytest.raises(LogGapError, match="seq 20"):
        async with asyncio.timeout(GAP_CHECK_AFTER_S + 20):
            async for seq, _ in DeltaLog(setup.store, LOG, setup.keyring).follow(0):
                seen.append(seq)
    assert seen == list(range(1, 20))


class ListingStore:
    """A real store that counts LIST calls (not a mock)."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.url, self.lists = inner, inner.url, 0

    def list(self, prefix: str, start_after: str | None = None,
             limit: int | None = None) -> AsyncIterator[str]:
        self.lists += 1
        return self.inner.list(prefix, start_after, limit)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_quiet_log_costs_one_list_per_interval_not_one_per_segment(
        setup: LogSetup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Segments further apart than GAP_CHECK_AFTER_S (a heartbeat-only log): the follower
    looks for a gap at most once per GAP_CHECK_INTERVAL_S, not after every segment."""
    monkeypatch.setattr("drstream.daemon.deltalog.GAP_CHECK_AFTER_S", 0.1)
    monkeypatch.setattr("drstream.daemon.deltalog.GAP_CHECK_INTERVAL_S", 60.0)
    writer = LogWriter(setup.store, LOG, setup.keyring)
    await writer.open()
    listing = ListingStore(setup.store)
    follower = DeltaLog(listing, LOG, setup.keyring)  # type: ignore[arg-type]
    seen: list[int] = []

    async def follow() -> None:
        async for seq, _ in follower.follow(40, poll_max_s=0.05):
            seen.append(seq)
            if seq == 46:
                return

    task = asyncio.create_task(follow())
    for i in range(6):
        await asyncio.sleep(0.4)  # 4 x GAP_CHECK_AFTER_S between segments
        await writer.append(body(1, start=1000 + i))
        await writer.flush()
    await asyncio.wait_for(task, 30)
    assert seen == list(range(41, 47))
    assert listing.lists == 1, f"{listing.lists} LISTs for 6 segments"


@pytest.mark.parametrize("command", ["replay", "status", "ship"])
async def test_the_commands_exit_3_naming_the_gap(setup: LogSetup, command: str) -> None:
    await setup.store.delete(setup.key(20))
    before = await contents(setup.store)
    cfg = str(setup.config_path)
    args = {"replay": ["replay", "--config", cfg, "--dry-run", "--stream", STREAM],
            "status": ["status", "--config", cfg],
            "ship": ["ship", "--config", cfg]}[command]
    if command == "ship":
        setup.config_path.write_text(setup.config_path.read_text() + yaml.safe_dump(DEAD_SOURCE))
    res = await asyncio.to_thread(drstream, *args, timeout=120)
    assert res.returncode == 3, show(res)
    assert "seq 20" in res.stderr and "Traceback" not in res.stderr, show(res)
    assert await contents(setup.store) == before
    res = await asyncio.to_thread(drstream, "verify", "--config", cfg)
    assert res.returncode == 1 and "seq 20: gap" in res.stdout, show(res)


async def test_a_segment_renamed_to_the_next_seq_is_not_the_end(setup: LogSetup) -> None:
    await rename(setup.store, setup.key(40), setup.key(41))
    before = await contents(setup.store)
    with pytest.raises(ChainError, match=r"misplaced.*seq 40.*seq 41"):
        await DeltaLog(setup.store, LOG, setup.keyring).end()
    with pytest.raises(ChainError, match="misplaced"):
        await status(setup.config, setup.store, setup.keyring)
    with pytest.raises(LogStateError, match=setup.key(41)):
        await LogWriter(setup.store, LOG, setup.keyring).open()
    assert await contents(setup.store) == before


# --------------------------------------------------------------------------- 2. the writer


@pytest.mark.parametrize("where", ["prev digest", "ciphertext"])
async def test_the_writer_deletes_nothing_that_fails_authentication(
        setup: LogSetup, where: str) -> None:
    data = await setup.store.get(setup.key(39)) or b""
    index = prev_digest_offset(data) + 5 if where == "prev digest" else len(data) - 40
    await replace(setup.store, setup.key(39), flip(data, index))
    before = await contents(setup.store)
    with pytest.raises(LogStateError) as stuck:
        await LogWriter(setup.store, LOG, setup.keyring).open()
    message = str(stuck.value)
    assert "seq 39" in message and setup.key(39) in message, message
    assert "changed nothing" in message
    assert await contents(setup.store) == before  # 39 and the good 40 are still there


async def test_a_head_from_another_chain_stops_the_writer(setup: LogSetup) -> None:
    foreign = encode_segment(body(1, start=999), log_id=LOG, seq=40, prev_digest=os.urandom(32),
                             keyring=setup.keyring)
    await replace(setup.store, setup.key(40), foreign)
    before = await contents(setup.store)
    with pytest.raises(LogStateError, match=r"does not link onto segment 39.*foreign chain"):
        await LogWriter(setup.store, LOG, setup.keyring).open()
    assert await contents(setup.store) == before


async def crash_leftovers(setup: LogSetup, seqs: list[int], store_them: list[int],
                          durable: int = 40) -> None:
    """What a writer killed with `seqs` in flight leaves: only `store_them` landed."""
    prev = segment_digest(await setup.store.get(setup.key(durable)) or b"")
    for seq in seqs:
        b = body(1, start=1000 + seq)
        b.manifest.extra["log"] = {"durable_seq": durable}
        data = encode_segment(b, log_id=LOG, seq=seq, prev_digest=prev, keyring=setup.keyring)
        prev = segment_digest(data)
        if seq in store_them:
            assert await setup.store.put_if_absent(setup.key(seq), data)


async def test_the_writer_cleans_only_its_own_crash_window(setup: LogSetup) -> None:
    # max_in_flight 4: 41 never landed, 42..44 did: a crash, cleaned up
    await crash_leftovers(setup, [41, 42, 43, 44], [42, 43, 44])
    writer = LogWriter(setup.store, LOG, setup.keyring, max_in_flight=4)
    await writer.open()
    assert writer.next_seq == 41
    assert sorted(await contents(setup.store)) == [setup.key(s) for s in range(1, 41)]


async def test_more_leftovers_than_the_window_are_left_alone(setup: LogSetup) -> None:
    await crash_leftovers(setup, [41, 42, 43, 44, 45], [42, 43, 44, 45])
    before = await contents(setup.store)
    with pytest.raises(LogStateError, match=r"max_in_flight 4"):
        await LogWriter(setup.store, LOG, setup.keyring, max_in_flight=4).open()
    assert await contents(setup.store) == before


async def test_a_leftover_that_fails_authentication_is_left_alone(setup: LogSetup) -> None:
    assert await setup.store.put_if_absent(setup.key(42), b"DRS1 not a segment at all")
    before = await contents(setup.store)
    with pytest.raises(LogStateError, match=setup.key(42)):
        await LogWriter(setup.store, LOG, setup.keyring, max_in_flight=4).open()
    assert await contents(setup.store) == before


# --------------------------------------------------------------------------- 3. names


DAMAGE = {
    "bad magic": lambda d: b"XRS1" + d[4:],
    "version": lambda d: d[:4] + b"\x07" + d[5:],
    "flags": lambda d: d[:5] + b"\x01" + d[6:],
    "log id": lambda d: d[:7] + b"!" + d[8:],
    "5 bytes": lambda d: d[:5],
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
async def test_a_damaged_header_names_its_object_and_seq(setup: LogSetup, damage: str) -> None:
    data = await setup.store.get(setup.key(7)) or b""
    await replace(setup.store, setup.key(7), DAMAGE[damage](data))
    with pytest.raises(SegmentFormatError) as err:
        await replay(setup.config, setup.store, setup.keyring, dry_run())
    assert err.value.seq == 7 and err.value.key == setup.key(7)
    assert f"seq 7 object {setup.key(7)}" in str(err.value), str(err.value)
