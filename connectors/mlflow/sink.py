"""MLflow sink: replays registry events on a standby registry, idempotently, in log order.

Each segment's events (the `EventBatch`es of the configured source stream) are applied
one by one. After every event the sink writes its progress (the segment's seq and digest
and how many of its events are done) into its checkpoint, a JSON tag on the registered
model `drstream.checkpoint.<log_id>.<sink name>` of the standby itself, so the standby
carries its own position and a restart re-runs at most the one event that was in flight.
Every handler therefore only has to be idempotent against "before", "after" or "half-way
through" its own event: it looks before it creates, and "not found" on a delete is done.

Version numbers are the primary's: MLflow numbers a new version max + 1 (deleted versions
keep their numbers), so to create version N the sink creates versions until the standby
hands out N and deletes the ones below it (reproducing the primary's gaps). Every version
it creates carries `drstream.source = <stream>/<model>/<N>`, so a version left over by a
crash (its number is not the N its tag names) is recognised and deleted.

Artifacts (a version's files, uploaded from the log's blobs before the version is
created) are the business of `artifacts.ReplicaArtifacts`; see that module.
"""

from __future__ import annotations

import functools
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from drstream.connectors.mlflow.artifacts import LOG_ID_TAG, ReplicaArtifacts
from drstream.connectors.mlflow.checkpoint import (
    CHECKPOINT_TAG,
    OWNER_TAG,
    decode_checkpoint,
    encode_checkpoint,
)
from drstream.connectors.mlflow.client import MlflowApiError, RegistryClient, tags_of
from drstream.connectors.mlflow.config import MlflowSinkConfig
from drstream.connectors.mlflow.events import (
    CHECKPOINT_MODEL_PREFIX,
    SOURCE_TAG,
    Event,
    EventError,
    seed_events,
    validate_event,
)
from drstream.daemon.codec import Body, EventBatch
from drstream.daemon.errors import SinkError, SinkFencedError
from drstream.daemon.lifecycle import Closing
from drstream.daemon.logging import get_logger
from drstream.daemon.plugins import Context
from drstream.daemon.progress import SinkProgress
from drstream.daemon.records import Checkpoint
from drstream.daemon.retry import Backoff, retrying
from drstream.daemon.secrets import read_secret

log = get_logger("drstream.mlflow.sink")
T = TypeVar("T")

NO_STAGE = "None"
# A registry that does not answer (restarting, 5xx) is retried this long per event
# before apply gives up with a retriable error.
RETRY = Backoff(base_s=0.2, max_s=5.0, deadline_s=120.0)
MAX_GAP_VERSIONS = 100_000  # sanity bound on placeholder versions for one gap


class MlflowSink(Closing):
    def __init__(self, config: MlflowSinkConfig, ctx: Context) -> None:
        self.config = config
        self.name = config.sink_name
        self.log_id = log_id = ctx.log_id
        self.blobs = ctx.blobs
        self.stream = config.source
        self._handlers = self.handlers()
        self.checkpoint_model = f"{CHECKPOINT_MODEL_PREFIX}{log_id}.{config.name}"
        self._client: RegistryClient | None = None
        self._artifacts = ReplicaArtifacts(
            lambda: self.client, ctx.blobs, sink=self.name, where=self._where(),
            log_id=log_id, experiment=f"drstream.{log_id}.{config.name}",
            artifact_prefix=config.artifact_prefix)
        self._progress = SinkProgress(self.name, self._write_checkpoint)
        self._started = False
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    # -- plumbing ------------------------------------------------------------------------

    def _where(self) -> str:
        return f"{self.name} ({self.config.tracking_uri})"

    @property
    def client(self) -> RegistryClient:
        if self._client is None:
            token = read_secret(self.config.token, "sinks[].token") if self.config.token \
                else None
            self._client = RegistryClient(self.config.tracking_uri, token=token,
                                          request_timeout_s=self.config.request_timeout_s,
                                          name=self.config.name)
        return self._client

    async def _retrying(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        def on_retry(e: Exception, attempt: int, delay: float) -> None:
            log.warning("mlflow_sink_retry", sink=self.name, what=what, error=str(e),
                        attempt=attempt, delay_s=round(delay, 2))

        try:
            return await retrying(fn, RETRY, on_retry=on_retry, retriable=lambda e: isinstance(
                e, MlflowApiError) and e.retriable)
        except MlflowApiError as e:
            raise SinkError(f"{self._where()}: {what}: {e}", retriable=e.retriable) from e

    def checkpoint(self) -> Checkpoint:
        return self._progress.cp

    # -- checkpoint ----------------------------------------------------------------------

    async def _read_checkpoint(self) -> tuple[Checkpoint, dict[str, Any] | None]:
        model = await self.client.get_model(self.checkpoint_model)
        if model is None:
            return Checkpoint(), None
        raw = tags_of(model.get("tags")).get(CHECKPOINT_TAG)
        if raw is None:
            return Checkpoint(), None
        return decode_checkpoint(raw, f"{self._where()} model {self.checkpoint_model!r}")

    async def _write_checkpoint(self, cp: Checkpoint, partial: dict[str, Any] | None,
                                retry: bool = True) -> None:
        value = encode_checkpoint(cp, partial)

        async def write() -> None:
            await self._check_owner()
            try:
                await self.client.set_model_tag(self.checkpoint_model, CHECKPOINT_TAG, value)
            except MlflowApiError as e:
                if not e.not_found:
                    raise
                await self._ensure_checkpoint_model()
                await self.client.set_model_tag(self.checkpoint_model, CHECKPOINT_TAG, value)

        if retry:
            await self._retrying(f"write checkpoint seq {cp.seq}", write)
        else:
            try:
                await write()
            except MlflowApiError as e:
                raise SinkError(f"{self._where()}: write checkpoint seq {cp.seq}: {e}",
                                retriable=e.retriable) from e

    async def _check_owner(self) -> None:
        model = await self.client.get_model(self.checkpoint_model)
        owner = tags_of(model.get("tags")).get(OWNER_TAG) if model is not None else None
        if owner != self._owner:
            raise SinkFencedError(
                f"{self._where()}: another apply ({owner or 'unknown'}) took over "
                f"{self.checkpoint_model!r}; this one ({self._owner}) stops")

    async def _take_ownership(self) -> None:
        async def take() -> None:
            await self._ensure_checkpoint_model()
            await self.client.set_model_tag(self.checkpoint_model, OWNER_TAG, self._owner)

        await self._retrying("take over the checkpoint model", take)

    async def _ensure_checkpoint_model(self) -> None:
        try:
            await self.client.create_model(
                self.checkpoint_model,
                description=f"drstream apply position of log {self.log_id!r} on this registry "
                            f"(sink {self.config.name!r}); do not edit",
                tags={LOG_ID_TAG: self.log_id})
        except MlflowApiError as e:
            if not e.already_exists:
                raise

    async def peek(self) -> Checkpoint:
        try:
            cp, _ = await self._read_checkpoint()
        except MlflowApiError as e:
            raise SinkError(f"{self._where()}: cannot read the checkpoint: {e}",
                            retriable=e.retriable) from e
        return cp

    async def start(self) -> Checkpoint:
        if self._started:
            return self._progress.cp
        self._started = True
        await self._take_ownership()
        self._progress.resume(*await self._retrying("read checkpoint", self._read_checkpoint))
        log.info("sink_started", sink=self.name, applied_seq=self._progress.cp.seq,
                 partial=self._progress.partial, registry=self.config.tracking_uri)
        return self._progress.cp

    async def sync_groups(self, force: bool = False) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        if self._client is None:
            return
        try:  # a registry that does not answer is not waited for at close (RETRY: 120 s)
            await self._progress.flush(functools.partial(self._write_checkpoint, retry=False))
        finally:
            await self._client.close()
            self._client = None

    # -- apply one segment ---------------------------------------------------------------

    def events_of(self, body: Body) -> list[Event]:
        return [ev for b in body.batches
                if isinstance(b, EventBatch) and b.stream == self.stream for ev in b.events]

    async def _seed_events(self, seq: int, body: Body) -> list[Event]:
        """The first segment of a pruned log: the events before it are gone, so the
        state after it (the state blob its manifest names) is rebuilt from nothing."""
        positions = body.manifest.positions.get(self.stream, {})
        if not positions.get("state_blob"):
            return self.events_of(body)
        if self.blobs is None:
            raise SinkError(f"{self.name}: segment {seq} starts a pruned log; rebuilding "
                            "the registry from its state blob needs the log's blob store")
        try:
            found = await seed_events(self.blobs, positions)
        except EventError as e:
            raise SinkError(f"{self.name}: segment {seq}: state blob "
                            f"{positions['state_blob']}: {e}") from e
        assert found is not None
        state, events = found
        log.warning("registry_seeded_from_state", sink=self.name, seq=seq,
                    models=len(state["models"]))
        return events

    async def apply(self, seq: int, digest: bytes, created_at_ms: int, body: Body) -> None:
        # Nothing applied yet and the log starts after seq 1 (pruned): seed from the state.
        events = (await self._seed_events(seq, body) if self._progress.cp.seq == 0 and seq > 1
                  else self.events_of(body))
        if events:  # a fenced apply must not change the standby before it notices
            await self._retrying("check the checkpoint model's owner", self._check_owner)
        for i, ev in enumerate(events):
            try:
                validate_event(ev)
            except EventError as e:
                raise SinkError(f"{self.name}: segment {seq} event #{i}: {e}") from e
        m = body.manifest
        newest = self._progress.cp.max_record_ms
        if m.max_timestamp_ms is not None:
            newest = max(newest or m.max_timestamp_ms, m.max_timestamp_ms)
        cp = Checkpoint(seq=seq, digest=digest, created_at_ms=created_at_ms,
                        max_record_ms=newest,
                        positions={self.stream: m.positions.get(self.stream, {})})
        await self._progress.apply(
            events, seq, digest, cp,
            lambda ev: self._retrying(_describe(ev), functools.partial(self._apply_event, ev)),
            unit="events")

    def handlers(self) -> dict[str, Callable[[Event], Awaitable[None]]]:
        """The handler of every registry event type (events.EVENT_FIELDS); each is
        idempotent against before, after and half-way through its own event."""
        return {
            "model.created": self._on_model_created,
            "model.renamed": self._on_model_renamed,
            "model.description": self._on_model_description,
            "model.deleted": self._on_model_deleted,
            "model.tag.set": self._on_model_tag_set,
            "model.tag.deleted": self._on_model_tag_deleted,
            "version.created": self._on_version_created,
            "version.description": self._on_version_description,
            "version.stage": self._on_version_stage,
            "version.tag.set": self._on_version_tag_set,
            "version.tag.deleted": self._on_version_tag_deleted,
            "version.deleted": self._on_version_deleted,
            "alias.set": self._on_alias_set,
            "alias.deleted": self._on_alias_deleted,
        }

    async def _apply_event(self, ev: Event) -> None:
        await self._handlers[ev["type"]](ev)

    # -- models --------------------------------------------------------------------------

    def _source_tag(self, name: str, version: int | None = None) -> str:
        return f"{self.stream}/{name}" + (f"/{version}" if version is not None else "")

    def _conflict(self, what: str) -> SinkError:
        return SinkError(f"{self._where()}: {what}; it was not replicated from {self.stream} "
                         "by this sink (remove it from the standby or rename it)")

    async def _model(self, name: str, what: str) -> dict[str, Any]:
        model = await self.client.get_model(name)
        if model is None:
            raise SinkError(f"{self._where()}: {what}: model {name!r} is missing on the "
                            "standby (the standby diverged from the log)")
        return model

    async def _on_model_created(self, ev: Event) -> None:
        name = ev["name"]
        model = await self.client.get_model(name)
        tags = {**ev["tags"], SOURCE_TAG: self._source_tag(name)}
        if model is None:
            try:
                await self.client.create_model(name, ev["description"], tags)
                return
            except MlflowApiError as e:  # created by the attempt whose answer was lost
                if not e.already_exists:
                    raise
                model = await self._model(name, "create model")
        have = tags_of(model.get("tags"))
        if have.get(SOURCE_TAG) != tags[SOURCE_TAG]:
            raise self._conflict(f"model {name!r} already exists")
        if (model.get("description") or "") != ev["description"]:
            await self.client.update_model_description(name, ev["description"])
        for k, v in tags.items():
            if have.get(k) != v:
                await self.client.set_model_tag(name, k, v)

    async def _on_model_renamed(self, ev: Event) -> None:
        old, new = ev["name"], ev["new_name"]
        if await self.client.get_model(old) is not None:
            if await self.client.get_model(new) is not None:
                raise self._conflict(f"cannot rename model {old!r}: {new!r} already exists")
            await self.client.rename_model(old, new)
        else:  # renamed before a restart, or by someone else: only ours may be adopted
            model = await self._model(new, f"rename model {old!r} to {new!r}")
            if tags_of(model.get("tags")).get(SOURCE_TAG) not in (self._source_tag(old),
                                                                self._source_tag(new)):
                raise self._conflict(f"cannot rename model {old!r}: it is missing and "
                                     f"{new!r} exists")
        await self.client.set_model_tag(new, SOURCE_TAG, self._source_tag(new))
        for v in await self.client.search_versions(new):
            n = int(v["version"])
            tag = self._source_tag(new, n)
            if tags_of(v.get("tags")).get(SOURCE_TAG) != tag:
                await self.client.set_version_tag(new, n, SOURCE_TAG, tag)

    async def _on_model_description(self, ev: Event) -> None:
        await self._must_exist(
            ev, self.client.update_model_description(ev["name"], ev["description"]))

    async def _on_model_deleted(self, ev: Event) -> None:
        await self._done_if_missing(self.client.delete_model(ev["name"]))

    async def _on_model_tag_set(self, ev: Event) -> None:
        await self._must_exist(
            ev, self.client.set_model_tag(ev["name"], ev["key"], ev["value"]))

    async def _on_model_tag_deleted(self, ev: Event) -> None:
        await self._done_if_missing(self.client.delete_model_tag(ev["name"], ev["key"]))

    async def _done_if_missing(self, call: Awaitable[None]) -> None:
        try:
            await call
        except MlflowApiError as e:
            if not e.not_found:
                raise

    async def _must_exist(self, ev: Event, call: Awaitable[None]) -> None:
        """An update of an object the standby lacks is a divergence: say what is missing."""
        try:
            await call
        except MlflowApiError as e:
            if not e.not_found:
                raise
            what = f"model {ev['name']!r}" + (
                f" version {ev['version']}" if "version" in ev else "")
            raise SinkError(f"{self._where()}: {ev['type']}: {what} is missing on the "
                            "standby (the standby diverged from the log)") from e

    # -- versions ------------------------------------------------------------------------

    async def _on_version_created(self, ev: Event) -> None:
        name, n = ev["name"], ev["version"]
        tag = self._source_tag(name, n)
        existing = await self.client.get_version(name, n)
        if existing is None:
            await self._model(name, f"create version {n}")
            run_id, source = await self._artifacts.upload(ev)
            existing = await self._create_numbered(ev, run_id, source, tag)
        elif tags_of(existing.get("tags")).get(SOURCE_TAG) != tag:
            raise self._conflict(f"version {n} of model {name!r} already exists")
        if ev["stage"] != NO_STAGE and existing.get("current_stage") != ev["stage"]:
            await self.client.transition_stage(name, n, ev["stage"])

    async def _create_numbered(self, ev: Event, run_id: str, source: str,
                               tag: str) -> dict[str, Any]:
        """Create versions until the standby hands out number N; the lower ones (gaps on
        the primary) are deleted again."""
        name, n = ev["name"], ev["version"]
        tags = {**ev["tags"], SOURCE_TAG: tag}
        for v in await self.client.search_versions(name):
            k = int(v["version"])
            if self._is_leftover(v, name):
                await self._done_if_missing(self.client.delete_version(name, k))
            elif k > n:
                raise SinkError(
                    f"{self._where()}: cannot create version {n} of model {name!r}: the "
                    f"standby already has version {k} and MLflow only numbers new versions "
                    "upward (the standby diverged from the log)")
        for _ in range(MAX_GAP_VERSIONS):
            created = await self.client.create_version(name, source, run_id,
                                                       ev["description"], tags)
            k = int(created["version"])
            if k == n:
                log.info("version_created", sink=self.name, model=name, version=n)
                return created
            await self.client.delete_version(name, k)
            if k > n:
                raise SinkError(
                    f"{self._where()}: cannot create version {n} of model {name!r}: the "
                    f"standby numbers the next version {k} (version {n} existed there and "
                    "was deleted; the standby diverged from the log)")
        raise SinkError(f"{self._where()}: version {n} of model {name!r}: gap too large")

    def _is_leftover(self, v: dict[str, Any], name: str) -> bool:
        """A version this sink created while reaching another number (a crash between
        create and delete): its source tag names a version other than its own."""
        tag = tags_of(v.get("tags")).get(SOURCE_TAG, "")
        prefix = f"{self.stream}/"
        if not tag.startswith(prefix):
            return False
        number = tag.rsplit("/", 1)[-1]
        return number.isdigit() and int(number) != int(v["version"])

    async def _on_version_description(self, ev: Event) -> None:
        await self._must_exist(ev, self.client.update_version_description(
            ev["name"], ev["version"], ev["description"]))

    async def _on_version_stage(self, ev: Event) -> None:
        v = await self.client.get_version(ev["name"], ev["version"])
        if v is None:
            raise SinkError(f"{self._where()}: version.stage: model {ev['name']!r} version "
                            f"{ev['version']} is missing on the standby")
        if v.get("current_stage") != ev["stage"]:
            await self.client.transition_stage(ev["name"], ev["version"], ev["stage"])

    async def _on_version_tag_set(self, ev: Event) -> None:
        await self._must_exist(ev, self.client.set_version_tag(
            ev["name"], ev["version"], ev["key"], ev["value"]))

    async def _on_version_tag_deleted(self, ev: Event) -> None:
        await self._done_if_missing(
            self.client.delete_version_tag(ev["name"], ev["version"], ev["key"]))

    async def _on_version_deleted(self, ev: Event) -> None:
        await self._done_if_missing(self.client.delete_version(ev["name"], ev["version"]))

    async def _on_alias_set(self, ev: Event) -> None:
        await self._must_exist(
            ev, self.client.set_alias(ev["name"], ev["alias"], ev["version"]))

    async def _on_alias_deleted(self, ev: Event) -> None:
        await self._done_if_missing(self.client.delete_alias(ev["name"], ev["alias"]))


def _describe(ev: Event) -> str:
    what = f"{ev['type']} model {ev.get('name')!r}"
    if "version" in ev:
        what += f" version {ev['version']}"
    return what
