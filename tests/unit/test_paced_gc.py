"""paced_gc: the automatic collector is off while segments are applied, cyclic garbage is
still collected on the interval, and the collector comes back as it was."""

from __future__ import annotations

import asyncio
import gc
import weakref

from drstream.daemon.applier import paced_gc


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
