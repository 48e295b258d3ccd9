"""paced_gc: the automatic collector is off while ship or apply runs, cyclic garbage is
still collected on the interval, what was alive at the start is frozen out of those
collections, and the collector comes back as it was."""

from __future__ import annotations

import asyncio
import gc
import weakref

from drstream.daemon.gcpace import paced_gc


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def make_cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


async def test_collector_is_off_inside_and_restored_after() -> None:
    assert gc.isenabled()
    async with paced_gc(interval_s=60):
        assert not gc.isenabled()
    assert gc.isenabled()


async def test_nested_uses_restore_the_collector_once_at_the_end() -> None:
    outer = paced_gc(interval_s=60)
    inner = paced_gc(interval_s=60)
    await outer.__aenter__()
    await inner.__aenter__()
    await outer.__aexit__(None, None, None)
    assert not gc.isenabled(), "an applier still running must keep the collector paused"
    await inner.__aexit__(None, None, None)
    assert gc.isenabled()


async def test_a_collector_disabled_before_stays_disabled() -> None:
    gc.disable()
    try:
        async with paced_gc(interval_s=60):
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


async def test_cycles_are_collected_on_the_interval() -> None:
    async with paced_gc(interval_s=0.05):
        ref = make_cycle()
        assert ref() is not None, "automatic collection should be off"
        for _ in range(100):
            if ref() is None:
                break
            await asyncio.sleep(0.02)
        assert ref() is None, "the paced collection never freed the cycle"


async def test_collector_is_restored_when_the_body_raises() -> None:
    try:
        async with paced_gc(interval_s=60):
            raise RuntimeError("apply failed")
    except RuntimeError:
        pass
    assert gc.isenabled()


async def test_what_was_alive_at_the_start_is_frozen_until_the_last_use_ends() -> None:
    assert gc.get_freeze_count() == 0
    outer = paced_gc(interval_s=60)
    await outer.__aenter__()
    frozen = gc.get_freeze_count()
    assert frozen > 0, "start-up objects should be frozen out of the paced collections"
    inner = paced_gc(interval_s=60)
    await inner.__aenter__()
    # (frozen objects freed by their last reference leave the count: it only shrinks)
    assert gc.get_freeze_count() <= frozen, "a nested use must not freeze again"
    await inner.__aexit__(None, None, None)
    assert gc.get_freeze_count() > 0, "the outer use still runs"
    await outer.__aexit__(None, None, None)
    assert gc.get_freeze_count() == 0


async def test_garbage_from_before_the_start_is_freed_not_frozen() -> None:
    ref = make_cycle()
    async with paced_gc(interval_s=60):
        assert ref() is None


async def test_a_cycle_alive_at_the_start_waits_for_the_end() -> None:
    """The price of freezing: a cycle among objects alive at the start that becomes
    garbage later is collected only once the loops end (start-up objects live as long
    as the process)."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    ref = weakref.ref(a)
    async with paced_gc(interval_s=0.02):
        del a, b
        for _ in range(5):
            await asyncio.sleep(0.02)
        assert ref() is not None, "a frozen object was traced"
    gc.collect()
    assert ref() is None, "unfrozen at the end, the cycle is collected"
