"""The checkpoint of one-change-at-a-time sinks (daemon/progress.py): round trip, refusal
of what is not one, resuming a half-applied segment, and when SinkProgress stores it."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drstream.daemon import progress
from drstream.daemon.errors import SinkError
from drstream.daemon.progress import (
    SinkProgress,
    apply_in_turn,
    changes_done,
    decode_checkpoint,
    encode_checkpoint,
    partial_after,
)
from drstream.daemon.records import Checkpoint

checkpoints = st.builds(
    Checkpoint, seq=st.integers(0, 2**62), digest=st.binary(min_size=32, max_size=32),
    created_at_ms=st.integers(0, 2**50), max_record_ms=st.none() | st.integers(0, 2**50),
    positions=st.dictionaries(st.text(max_size=8), st.dictionaries(
        st.text(max_size=8), st.lists(st.text(max_size=8), max_size=3), max_size=3),
        max_size=3))


@given(checkpoints, st.none() | st.tuples(st.integers(1, 2**40), st.integers(0, 10**6)))
def test_round_trip(cp: Checkpoint, part: tuple[int, int] | None) -> None:
    partial = None if part is None else partial_after(part[0], cp.digest, part[1])
    assert decode_checkpoint(encode_checkpoint(cp, partial), "w") == (cp, partial)


@pytest.mark.parametrize("raw", ["", "[]", '{"seq": 1}', '{"seq": "x", "digest": "", '
                                 '"created_at_ms": 0}', '{"seq": 1, "digest": "zz", '
                                 '"created_at_ms": 0}'])
def test_what_is_not_a_checkpoint_is_refused_naming_where(raw: str) -> None:
    with pytest.raises(SinkError, match=r"^cp-object: unreadable checkpoint"):
        decode_checkpoint(raw, "cp-object")


def test_a_restart_resumes_after_the_changes_done_and_only_in_that_segment() -> None:
    digest = bytes(32)
    partial = partial_after(7, digest, 2)
    assert changes_done(partial, 7, digest, "s") == 2
    assert changes_done(partial, 8, digest, "s") == 0
    assert changes_done(None, 7, digest, "s") == 0
    with pytest.raises(SinkError, match="segment 7 differs"):
        changes_done(partial, 7, b"\x01" * 32, "s")
    applied: list[int] = []
    written: list[int] = []

    async def one(change: int) -> None:
        applied.append(change)

    async def write(p: dict[str, object]) -> None:
        written.append(int(str(p["done"])))

    asyncio.run(apply_in_turn([10, 11, 12, 13], 7, digest, 2, one, write))
    assert applied == [12, 13] and written == [3]


def test_sink_progress_resumes_stores_after_changes_and_flushes_idle_segments(
        monkeypatch: pytest.MonkeyPatch) -> None:
    digest = bytes(32)
    stored: list[tuple[int, int | None]] = []  # (seq, done) of each checkpoint written

    async def write(cp: Checkpoint, partial: dict[str, object] | None) -> None:
        stored.append((cp.seq, None if partial is None else int(str(partial["done"]))))

    sink = SinkProgress("s", write)
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    sink.resume(Checkpoint(seq=6), partial_after(7, digest, 1))
    applied: list[str] = []

    async def one(change: str) -> None:
        applied.append(change)

    async def run() -> None:
        await sink.apply(["a", "b", "c"], 7, digest, Checkpoint(seq=7), one, unit="events")
        assert applied == ["b", "c"] and stored == [(6, 2), (7, None)]
        assert sink.partial is None and sink.cp.seq == 7
        await sink.apply([], 8, digest, Checkpoint(seq=8), one, unit="events")
        assert stored[-1] == (7, None) and sink.cp.seq == 8  # idle: in memory only
        clock[0] += progress.IDLE_CHECKPOINT_INTERVAL_S
        await sink.apply([], 9, digest, Checkpoint(seq=9), one, unit="events")
        assert stored[-1] == (9, None)  # idle, but the interval passed
        await sink.apply([], 10, digest, Checkpoint(seq=10), one, unit="events")
        await sink.flush()
        assert stored[-1] == (10, None)
        await sink.flush()  # nothing moved since
        assert len(stored) == 4

    asyncio.run(run())


def test_a_checkpoint_not_stored_at_close_is_logged_not_raised() -> None:
    calls: list[int] = []

    async def refused(cp: Checkpoint, partial: dict[str, object] | None) -> None:
        calls.append(cp.seq)
        raise SinkError("registry down")

    sink = SinkProgress("s", refused)
    sink.cp = Checkpoint(seq=3)
    asyncio.run(sink.flush())
    asyncio.run(sink.flush())  # still not stored: tried again
    assert calls == [3, 3]
