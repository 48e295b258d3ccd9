"""Bucket notifications as a latency hint (connectors/s3/notify.py), against the S3 API
server, which sends a bucket's object events to an SQS queue it also serves (moto in
server mode, like S3 -> SQS).

- With `interval_s` far longer than the test, a new object reaches the standby only
  because its notification woke the listing; the control run without the hint shows
  that the object does not arrive in the same time otherwise.
- A queue that cannot be reached, or does not exist, stops only the hint: the source
  lists every `interval_s`, the warning says so once, and ship stops cleanly.
- The poll loop itself: 26 waiting messages make at most 3 wakes; every message is
  deleted; close during a long poll, twice.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from drstream.connectors.s3.notify import HINT_UP, NotificationsConfig, QueueHint
from drstream.connectors.s3.objconfig import ObjectSourceConfig
from tests.infra.s3 import S3Server
from tests.integration.applylib import ProcessPool, process_pool
from tests.integration.objectslib import (
    notify_queue,
    queued,
    view,
    wait_equal,
    write_objects_config,
)
from tests.support.procs import wait_for

pytestmark = pytest.mark.integration

# Far beyond any wait below: within the test only a notification starts a listing.
NEVER_S = 600
# How long the control run waits for an object no listing is due to pick up; the hinted
# run typically needs 1 to 3 s (long poll answer, listing, capture, apply).
CONTROL_WAIT_S = 12


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    with process_pool(tmp_path) as p:
        yield p


@pytest.fixture
def buckets(s3: S3Server, s3_creds_env: None,
            s3_buckets: Callable[[], str]) -> tuple[str, str]:
    return s3_buckets(), s3_buckets()


def _dead_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("hint", [True, False], ids=["hint", "control-without-hint"])
def test_new_object_arrives_by_notification_not_interval(
        s3: S3Server, buckets: tuple[str, str], pool: ProcessPool, tmp_path: Path,
        hint: bool) -> None:
    primary, standby = buckets
    queue = notify_queue(s3, primary, "data")
    source: dict[str, object] = {"interval_s": NEVER_S}
    if hint:
        source["notifications"] = {"sqs_queue_url": queue, "wait_s": 2}
    setup = write_objects_config(tmp_path, s3, source_bucket=primary, standby_bucket=standby,
                                 source=source)
    # the listing every start does ships this one
    s3.client.put_object(Bucket=primary, Key="data/first.txt", Body=b"first")
    ship, apply = pool.ship(setup), pool.apply(setup)
    ship.wait_ready(60)
    apply.wait_ready(60)
    wait_equal(s3, (primary, "data"), (standby, "replica"), [ship, apply], timeout=60)
    if hint:  # the messages so far (test event, first.txt) consumed
        ship.wait_output("s3_notifications_connected", 60)
        wait_for(lambda: queued(s3, queue) == 0, 30, "the queue drained")
    # no listing is due for NEVER_S: only a notification brings this one over
    s3.client.put_object(Bucket=primary, Key="data/second.txt", Body=b"second",
                         Metadata={"via": "notification"})
    if hint:
        have = wait_equal(s3, (primary, "data"), (standby, "replica"), [ship, apply],
                          timeout=60)
        assert set(have) == {"first.txt", "second.txt"}
        # every message the hint consumed was deleted
        wait_for(lambda: queued(s3, queue) == 0, 30, "the queue drained")
    else:
        time.sleep(CONTROL_WAIT_S)
        assert set(view(s3, standby, "replica")) == {"first.txt"}
        assert queued(s3, queue) >= 1  # the events were sent; nothing read them
    ship.stop_ok()
    apply.stop_ok()


@pytest.mark.parametrize("where", ["closed-port", "no-such-queue"])
def test_unreachable_queue_falls_back_to_interval(
        s3: S3Server, buckets: tuple[str, str], pool: ProcessPool, tmp_path: Path,
        where: str) -> None:
    primary, standby = buckets
    if where == "closed-port":
        queue = f"http://127.0.0.1:{_dead_port()}/123456789012/gone"
    else:
        queue = f"{s3.endpoint_url}/123456789012/no-such-queue"
    setup = write_objects_config(
        tmp_path, s3, source_bucket=primary, standby_bucket=standby,
        source={"interval_s": 1, "notifications": {"sqs_queue_url": queue, "wait_s": 1}})
    ship, apply = pool.ship(setup), pool.apply(setup)
    ship.wait_ready(60)
    apply.wait_ready(60)
    for i in range(3):
        s3.client.put_object(Bucket=primary, Key=f"data/k{i}", Body=f"secret-body-{i}".encode())
        have = wait_equal(s3, (primary, "data"), (standby, "replica"), [ship, apply],
                          timeout=60)
        assert f"k{i}" in have
    out = ship.output()
    # once per outage, naming the queue and the fallback, never an object's bytes
    assert out.count("s3_notifications_unreachable") == 1, ship.tail(60)
    assert "interval_s" in out and "secret-body" not in out
    assert "s3_notifications_connected" not in out
    ship.stop_ok()
    apply.stop_ok()


async def test_poll_coalesces_deletes_and_closes_mid_poll(
        s3: S3Server, s3_creds_env: None, s3_bucket: str) -> None:
    queue = notify_queue(s3, s3_bucket, "data")
    source = ObjectSourceConfig.model_validate({**s3.store_fields(s3_bucket, "data"),
                                                "name": "hinted"})
    wakes: list[float] = []
    hint = QueueHint(NotificationsConfig(sqs_queue_url=queue, wait_s=20), source,
                     source.stream, "sources[s3:hinted].notifications")

    def wake() -> None:
        wakes.append(time.monotonic())

    # 25 object events and the configuration's test event wait in the queue
    for i in range(25):
        s3.client.put_object(Bucket=s3_bucket, Key=f"data/{i}", Body=b"x")
    async with hint:
        await hint.start(wake)
        await hint.start(wake)  # idempotent: one poll task
        for _ in range(600):
            if hint.messages >= 26 and await asyncio.to_thread(queued, s3, queue) == 0:
                break
            await asyncio.sleep(0.05)
        assert hint.messages == 26 and hint.connected is True
        assert HINT_UP.labels(source.stream)._value.get() == 1
        assert 1 <= len(wakes) <= 3  # up to 10 messages a receive, one wake each
        assert await asyncio.to_thread(queued, s3, queue) == 0
        # now a 20 s long poll is in flight; closing cancels it (and again: idempotent)
        await hint.close()
        await hint.close()
    assert HINT_UP.labels(source.stream)._value.get() == 0
