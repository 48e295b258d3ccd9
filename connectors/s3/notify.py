"""Bucket event notifications as a latency hint (docs/datasets.md).

The primary bucket sends its ObjectCreated/ObjectRemoved events to an SQS queue (the
bucket's notification configuration). `QueueHint` long-polls that queue and, on any
message, wakes the object source's next listing at once instead of at `interval_s` (the
source's WakeHint, daemon/objsource.py).

Only a hint, like the MLflow webhook: no message is parsed for what changed (the listing
decides), so a lost, late, duplicated or forged message costs latency or one extra
listing, never correctness. Messages are deleted once they have woken the source: a
listing that starts after the wake sees the object (S3 sends the event after the write),
and a crash before that listing is covered by the listing every start does.

An unreachable queue stops only the hint: the poll backs off (daemon/retry.py) and
retries for as long as the source runs, while the source lists every `interval_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field, field_validator

from drstream.connectors.s3.store import S3BucketConfig, credentials
from drstream.daemon.lifecycle import Closing
from drstream.daemon.logging import get_logger
from drstream.daemon.metrics import REGISTRY
from drstream.daemon.remotestore import http_endpoint
from drstream.daemon.retry import Backoff

log = get_logger("drstream.s3.notify")

DEFAULT_WAIT_S = 20  # the longest long poll SQS allows
MAX_MESSAGES = 10  # the most one ReceiveMessage returns
# A queue that is down is asked again after 1 s, 2 s, ... up to a minute: the source
# lists every interval_s meanwhile, so a slow retry costs nothing but latency.
RETRY_MIN_S = 1.0
RETRY_MAX_S = 60.0

HINT_UP = Gauge("drstream_s3_notifications_up", "1 while the source's notification queue "
                "answers its long polls, 0 while it does not (the source lists every "
                "interval_s meanwhile)", ["stream"], registry=REGISTRY)
HINT_MESSAGES = Counter("drstream_s3_notification_messages", "Bucket notification messages "
                        "received (and deleted) from the queue", ["stream"], registry=REGISTRY)


def _nothing() -> None:
    """What a QueueHint wakes before `start` says."""


class NotificationsConfig(BaseModel):
    """An SQS queue the source's bucket sends its object events to; the source's region
    and credentials are used unless said here."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sqs_queue_url: str = Field(description="the queue's URL (GetQueueUrl)")
    endpoint_url: str | None = Field(
        None, description="SQS endpoint (default: the queue URL's scheme and host)")
    region: str | None = Field(None, description="the queue's region (default: the source's)")
    wait_s: int = Field(DEFAULT_WAIT_S, ge=1, le=20, description="long poll per request")

    @field_validator("sqs_queue_url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc or \
                parts.path in ("", "/"):
            raise ValueError("not a queue URL (https://sqs.<region>.amazonaws.com/"
                             "<account>/<queue>)")
        if "@" in parts.netloc or parts.query or parts.fragment:  # it is logged
            raise ValueError("must not carry credentials, a query or a fragment (the "
                             "source's access_key_id/secret_access_key reach the queue)")
        return value

    _endpoint = field_validator("endpoint_url")(http_endpoint)

    def endpoint(self) -> str:
        if self.endpoint_url:
            return self.endpoint_url
        parts = urlsplit(self.sqs_queue_url)
        return f"{parts.scheme}://{parts.netloc}"


class QueueHint(Closing):
    """Long-polls one queue in a task from `start(wake)`; `wake()` on each non-empty
    receive (so many messages make one wake)."""

    def __init__(self, config: NotificationsConfig, bucket: S3BucketConfig, stream: str,
                 where: str) -> None:
        self.config = config
        self.bucket = bucket
        self.stream = stream
        self.where = where  # the config section, in a secret's error
        self.wake: Callable[[], None] = _nothing
        self.connected: bool | None = None  # None until the first poll answers or fails
        self.messages = 0
        self._failures = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self, wake: Callable[[], None]) -> None:
        if self._task is None:
            self.wake = wake
            HINT_UP.labels(self.stream).set(0)
            self._task = asyncio.create_task(self._run(), name=f"{self.stream} notifications")
            log.info("s3_notifications_started", stream=self.stream,
                     queue=self.config.sqs_queue_url)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()  # a long poll in flight is dropped, not waited for
            with contextlib.suppress(asyncio.CancelledError):
                await task
            HINT_UP.labels(self.stream).set(0)

    async def _run(self) -> None:
        while True:
            try:
                async with self._client() as sqs:
                    while True:
                        await self._poll(sqs)
            except Exception as e:  # whatever breaks, only the hint stops
                self._failures += 1
                delay = Backoff(RETRY_MIN_S, RETRY_MAX_S).delay(self._failures)
                self._down(e, delay)
                await asyncio.sleep(delay)

    def _client(self) -> Any:
        b = self.bucket
        return get_session().create_client(
            "sqs", region_name=self.config.region or b.region, endpoint_url=self.config.endpoint(),
            config=AioConfig(connect_timeout=b.connect_timeout_s,
                             # the server holds a long poll wait_s before it answers
                             read_timeout=self.config.wait_s + b.read_timeout_s,
                             retries={"total_max_attempts": 1, "mode": "standard"}),
            **credentials(b, self.where))

    async def _poll(self, sqs: Any) -> None:
        resp = await sqs.receive_message(QueueUrl=self.config.sqs_queue_url,
                                         MaxNumberOfMessages=MAX_MESSAGES,
                                         WaitTimeSeconds=self.config.wait_s)
        self._up()
        messages = resp.get("Messages") or []
        if not messages:
            return
        self.messages += len(messages)
        HINT_MESSAGES.labels(self.stream).inc(len(messages))
        self.wake()
        # a message left undeleted comes back after the queue's visibility timeout: one
        # more wake, harmless
        await sqs.delete_message_batch(QueueUrl=self.config.sqs_queue_url, Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
            for i, m in enumerate(messages)])

    def _up(self) -> None:
        if self.connected is not True:
            log.info("s3_notifications_connected", stream=self.stream,
                     queue=self.config.sqs_queue_url)
        self.connected = True
        self._failures = 0
        HINT_UP.labels(self.stream).set(1)

    def _down(self, e: Exception, delay: float) -> None:
        if self.connected is not False:  # once per outage; the error names no payload
            log.warning("s3_notifications_unreachable", stream=self.stream,
                        queue=self.config.sqs_queue_url, error=f"{type(e).__name__}: {e}",
                        retry_s=round(delay, 2), fallback="interval_s")
        self.connected = False
        HINT_UP.labels(self.stream).set(0)
