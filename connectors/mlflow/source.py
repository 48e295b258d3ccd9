"""MLflow source: reconcile the primary registry against the last shipped state.

The log is the source's memory: its positions are `{"state_blob", "state_digest"}`, the
blob holding the canonical JSON of the registry state it shipped last. On every
reconcile (each `interval_s`, and at once when a valid webhook arrives) it snapshots the
live registry, captures the files of versions it has not shipped yet into blobs
(streamed chunk by chunk, content-addressed), diffs old against new state, stores the new
state blob and only then hands the pipeline one Delivery with the events and the new
positions. A crash before the segment is durable replays the same diff from the old
state: events reach the log at least once, and the sink applies them idempotently.

An unreachable registry is not an error for `ship`: the source reports it
(`drstream_source_up{stream}` = 0, `health()`), keeps what is in the log and retries
until the registry answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from drstream.connectors.mlflow import metrics
from drstream.connectors.mlflow.client import MlflowApiError, RegistryClient, Snapshot, keep_aliases
from drstream.connectors.mlflow.config import MlflowSourceConfig
from drstream.connectors.mlflow.events import (
    EventError,
    State,
    adopt_identities,
    check_artifact_path,
    diff,
    dump_state,
    empty_state,
    read_state_blob,
)
from drstream.connectors.mlflow.webhook import WebhookReceiver
from drstream.daemon.blobs import MAX_CHUNK
from drstream.daemon.codec import EventBatch
from drstream.daemon.errors import DrstreamError, SourceError
from drstream.daemon.lifecycle import Closing
from drstream.daemon.logging import get_logger
from drstream.daemon.plugins import Context
from drstream.daemon.retry import poll_retry_s
from drstream.daemon.secrets import read_secret
from drstream.daemon.source import Delivery, SourceProbe

log = get_logger("drstream.mlflow.source")

# A registry that stopped answering is polled again after 0.5 s, doubling to this (or to
# interval_s, if shorter).
RETRY_MAX_S = 10.0
CAPTURE_QUEUE = 2  # chunks downloaded ahead of the blob upload, per file
# Artifact bytes captured per reconcile: past this, the remaining new versions are left
# for the next reconcile (which starts at once), so a large initial sync is shipped, and
# checkpointed in the log, in steps instead of all or nothing.
CAPTURE_BUDGET_BYTES = 2 << 30
# A reconcile that left models out because the registry kept changing them under its
# listings looks again this soon (or at interval_s, if shorter).
NARROWED_RETRY_S = 1.0


class MlflowSource(Closing):
    def __init__(self, config: MlflowSourceConfig, ctx: Context) -> None:
        self.config = config
        self.stream = config.stream
        self.blobs = ctx.blobs
        self.webhook_name = f"drstream-{ctx.log_id}"
        self._state: State = empty_state()
        self._positions: dict[str, Any] = {}
        self._client: RegistryClient | None = None
        self._receiver: WebhookReceiver | None = None
        self._webhook_registered = False
        self._wake = asyncio.Event()
        self._next_at = 0.0  # monotonic time of the next interval reconcile
        self._failures = 0
        self._more = False  # the last reconcile left new versions for the next one
        self._narrowed = False  # the last reconcile left moving models as they were
        self.up: bool | None = None  # None until the first reconcile
        self.last_error: str | None = None
        self.reconciles = 0
        self.webhook_wakeups = 0

    # -- lifecycle -----------------------------------------------------------------------

    def _token(self) -> str | None:
        if self.config.token is None:
            return None
        return read_secret(self.config.token, f"sources[{self.stream}].token")

    def _new_client(self) -> RegistryClient:
        return RegistryClient(self.config.tracking_uri, token=self._token(),
                              request_timeout_s=self.config.request_timeout_s,
                              name=self.config.name)

    async def _load_state(self, positions: dict[str, Any]) -> State:
        bid = positions.get("state_blob")
        if not bid:
            return empty_state()
        if self.blobs is None:
            raise SourceError(f"{self.stream}: positions name state blob {bid} but no blob "
                              "store was given")
        # a blob's id is the SHA-256 of its content, checked on read
        if positions.get("state_digest") not in (None, bid):
            raise SourceError(f"{self.stream}: state blob {bid} has digest {bid}, the log "
                              f"says {positions.get('state_digest')}")
        try:
            found = await read_state_blob(self.blobs, positions)
        except EventError as e:
            raise SourceError(f"{self.stream}: state blob {bid}: {e}") from e
        assert found is not None
        return found[1]

    async def start(self, positions: dict[str, Any] | None) -> None:
        if self._client is not None:
            return
        if self.blobs is None:
            raise SourceError(f"{self.stream}: the mlflow source needs a blob store")
        self._positions = dict(positions or {})
        self._state = await self._load_state(self._positions)
        self._client = self._new_client()
        metrics.SOURCE_UP.labels(self.stream).set(0)
        if self.config.webhook is not None:
            hook = self.config.webhook
            self._receiver = WebhookReceiver(
                hook.listen, read_secret(hook.secret, f"sources[{self.stream}].webhook.secret"),
                hook.tolerance_s, self.stream, self._on_webhook)
            await self._receiver.start()
            await self._register_webhook()
        self._next_at = 0.0  # reconcile at the first read
        log.info("mlflow_source_started", stream=self.stream,
                 models=len(self._state["models"]),
                 state_blob=self._positions.get("state_blob"),
                 webhook=self._receiver.url if self._receiver else None)

    async def close(self) -> None:
        if self._receiver is not None:
            await self._receiver.stop()
            self._receiver = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    def reconfigure(self, config: MlflowSourceConfig) -> None:
        """Interval, chunk size, selection and timeouts apply from the next reconcile;
        webhook and tracking_uri changes need a restart."""
        self.config = config
        self._next_at = 0.0

    # -- webhooks --------------------------------------------------------------------------

    @property
    def webhook_url(self) -> str | None:
        if self._receiver is None or self.config.webhook is None:
            return None
        return self.config.webhook.public_url or self._receiver.url

    def _on_webhook(self) -> None:
        self.webhook_wakeups += 1
        self._wake.set()

    async def _register_webhook(self) -> None:
        """Create or update the primary's webhook `drstream-<log_id>`; retried at each
        reconcile while the registry is down. A registry without webhook support only
        loses the latency hint."""
        if self._receiver is None or self._webhook_registered or self._client is None:
            return
        assert self.webhook_url is not None
        try:  # the secret the receiver checks deliveries against, read once at start
            await self._client.ensure_webhook(self.webhook_name, self.webhook_url,
                                              self._receiver.secret)
            self._webhook_registered = True
            log.info("mlflow_webhook_registered", stream=self.stream, name=self.webhook_name,
                     url=self.webhook_url)
        except MlflowApiError as e:
            log.warning("mlflow_webhook_not_registered", stream=self.stream, error=str(e),
                        retry=e.retriable)
            if not e.retriable:
                self._webhook_registered = True  # do not retry: interval reconciles only

    # -- reading ---------------------------------------------------------------------------

    async def read(self, timeout_s: float) -> Delivery | None:
        now = time.monotonic()
        wait = min(timeout_s, max(0.0, self._next_at - now))
        if not self._wake.is_set() and wait > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
        woken = self._wake.is_set()
        if not woken and time.monotonic() < self._next_at:
            return None
        self._wake.clear()
        if self._more:
            trigger = "continue"
        elif woken:
            trigger = "webhook"
        else:
            trigger = "start" if self.reconciles == 0 else "interval"
        self._more = False
        return await self._reconcile_now(trigger)

    async def _reconcile_now(self, trigger: str) -> Delivery | None:
        started = time.monotonic()
        try:
            delivery = await self._reconcile(trigger)
        except MlflowApiError as e:
            if not e.retriable:
                raise SourceError(f"{self.stream}: {e}", retriable=False) from e
            self._down(e)
            return None
        except DrstreamError as e:
            if not e.retriable:
                raise
            # the log's store (blobs) is down: retry the whole reconcile later; the
            # registry itself answered, so it is not reported as unreachable
            self._failures += 1
            self._next_at = time.monotonic() + self._backoff()
            log.warning("mlflow_reconcile_failed", stream=self.stream, error=str(e))
            return None
        self._failures = 0
        wait = min(self.config.interval_s, NARROWED_RETRY_S) if self._narrowed \
            else self.config.interval_s
        self._next_at = time.monotonic() + wait
        metrics.RECONCILE_SECONDS.labels(self.stream).observe(time.monotonic() - started)
        return delivery

    def _backoff(self) -> float:
        return poll_retry_s(self._failures, self.config.interval_s, RETRY_MAX_S)

    def _down(self, e: DrstreamError) -> None:
        self._failures += 1
        self._next_at = time.monotonic() + self._backoff()
        if self.up is not False:
            log.warning("mlflow_registry_unreachable", stream=self.stream, error=str(e))
        self.up = False
        self.last_error = str(e)
        metrics.SOURCE_UP.labels(self.stream).set(0)

    def _mark_up(self) -> None:
        if self.up is False:
            log.info("mlflow_registry_reachable_again", stream=self.stream)
        self.up = True
        self.last_error = None
        metrics.SOURCE_UP.labels(self.stream).set(1)

    async def _reconcile(self, trigger: str) -> Delivery | None:
        assert self._client is not None and self.blobs is not None
        snap = await self._client.snapshot(self._state, self.config.models)
        self._mark_up()
        await self._register_webhook()  # if the registry was down at start
        metrics.RECONCILES.labels(self.stream, trigger).inc()
        self.reconciles += 1
        self._narrowed = bool(snap.narrowed)
        if snap.narrowed:
            log.warning("mlflow_models_kept_moving", stream=self.stream, models=snap.narrowed,
                        retry_s=min(self.config.interval_s, NARROWED_RETRY_S))
        captured, deferred = 0, []
        for name, version in snap.missing:
            if captured >= CAPTURE_BUDGET_BYTES:
                deferred.append((name, version))
            else:
                captured += await self._capture(snap, name, version)
        if deferred:
            self._defer(snap, deferred)
            self._more = True
            self._wake.set()  # continue at once with the rest
        new = snap.state
        self._state = adopt_identities(self._state, new)  # a state from an older version
        events = diff(self._state, new)
        if not events:
            return None
        raw = dump_state(new)
        if len(raw) > MAX_CHUNK:
            raise SourceError(f"{self.stream}: the registry state is {len(raw)} bytes, over the "
                              f"{MAX_CHUNK}-byte blob limit (narrow `models` or raise chunk "
                              "sizes to shorten chunk lists)", retriable=False)
        bid = await self.blobs.put(raw)
        positions = {"state_blob": bid, "state_digest": bid}  # the id is its SHA-256
        self._state, self._positions = new, positions
        metrics.EVENTS.labels(self.stream).inc(len(events))
        log.info("mlflow_changes", stream=self.stream, trigger=trigger, events=len(events),
                 new_versions=len(snap.missing) - len(deferred), deferred=len(deferred))
        return Delivery(batches=[], positions=dict(positions),
                        nbytes=len(json.dumps(events, separators=(",", ":"))),
                        events=[EventBatch(self.stream, events)])

    # -- artifacts -------------------------------------------------------------------------

    def _defer(self, snap: Snapshot, versions: list[tuple[str, int]]) -> None:
        """Leave `versions` out of this step's state. An alias that points at one keeps
        its shipped target when that is still in the state (else it waits too), so no
        intermediate state moves or drops a serving alias that the registry did not."""
        for name, version in versions:
            m = snap.state["models"][name]
            m["versions"].pop(str(version), None)
        for name in {n for n, _ in versions}:
            keep_aliases(snap.state["models"][name],
                         self._state["models"].get(name, {}).get("aliases", {}))

    async def _capture(self, snap: Snapshot, name: str, version: int) -> int:
        """Stream the version's files into blobs; fills its `artifacts` in `snap.state`;
        the bytes read. A version deleted meanwhile is dropped from the snapshot (the next
        one agrees)."""
        assert self._client is not None
        what = f"version {version} of model {name!r}"
        source = snap.state["models"][name]["versions"][str(version)]["source"]
        try:
            root = await self._client.version_root(name, version, source)
            files = await self._client.list_artifacts(root)
            artifacts = []
            for f in files:
                reason = check_artifact_path(f.path)
                if reason is not None:
                    raise MlflowApiError(f"{self.stream}: {what}: artifact path {f.path!r} "
                                         f"{reason}", retriable=False)
                artifacts.append(await self._capture_file(f"{root}/{f.path}", f.path, f.size,
                                                          what))
        except MlflowApiError as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                self._defer(snap, [(name, version)])
                return 0
            raise
        snap.state["models"][name]["versions"][str(version)]["artifacts"] = artifacts
        return sum(int(a["size"]) for a in artifacts)

    async def _capture_file(self, path: str, rel: str, size: int, what: str) -> dict[str, Any]:
        """Download one file in chunk_bytes pieces and put each as a blob; at most
        CAPTURE_QUEUE + 2 chunks are in memory (download runs ahead of the upload)."""
        assert self._client is not None and self.blobs is not None
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(CAPTURE_QUEUE)
        client = self._client

        async def produce() -> None:
            chunks: AsyncIterator[bytes] = client.download(path, self.config.chunk_bytes)
            async for chunk in chunks:
                await queue.put(chunk)
            await queue.put(None)

        producer = asyncio.create_task(produce())
        h = hashlib.sha256()
        ids: list[str] = []
        total = 0
        try:
            while True:
                if producer.done():
                    producer.result()  # raises the download error, if any
                    chunk = await queue.get()  # a finished producer queued None last
                else:
                    get = asyncio.create_task(queue.get())
                    done, _ = await asyncio.wait({get, producer},
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if get not in done:
                        get.cancel()
                        continue
                    chunk = get.result()
                if chunk is None:
                    break
                h.update(chunk)
                total += len(chunk)
                ids.append(await self.blobs.put(chunk))
                metrics.ARTIFACT_BYTES.labels(self.stream).inc(len(chunk))
            await producer
        finally:
            if not producer.done():
                producer.cancel()
                with contextlib.suppress(asyncio.CancelledError, MlflowApiError):
                    await producer
        if total != size:
            raise MlflowApiError(f"{self.stream}: {what}: artifact {rel!r} read {total} bytes, "
                                 f"listed as {size} (changing while read?)", retriable=True)
        return {"path": rel, "size": total, "sha256": h.hexdigest(), "chunks": ids}

    # -- pipeline hooks --------------------------------------------------------------------

    def positions(self) -> dict[str, Any]:
        return dict(self._positions)

    def release(self, nbytes: int) -> None:
        """Deliveries hold no buffered payload (artifacts are already blobs)."""

    async def durable(self, positions: dict[str, Any]) -> None:
        """Nothing to commit on the registry."""

    def health(self) -> tuple[bool, str]:
        """Readiness of this source: the registry answered the last reconcile."""
        if self.up is None:
            return False, f"{self.stream}: no reconcile yet"
        if not self.up:
            return False, f"{self.stream}: registry unreachable: {self.last_error}"
        return True, "ready"

    async def probe(self, positions: dict[str, Any]) -> SourceProbe:
        """Reachability and how many changes the live registry has beyond `positions`
        (artifacts are not read; each new version counts as one change)."""
        client = self._client or self._new_client()
        try:
            try:
                old = await self._load_state(positions) if positions else empty_state()
            except DrstreamError as e:
                ok = await client.health()
                return SourceProbe(reachable=ok, error=f"cannot load the shipped state: {e}")
            snap = await client.snapshot(old, self.config.models)
            return SourceProbe(reachable=True, pending_records=len(diff(old, snap.state)))
        except MlflowApiError as e:
            return SourceProbe(reachable=False, error=str(e))
        finally:
            if client is not self._client:
                await client.close()
