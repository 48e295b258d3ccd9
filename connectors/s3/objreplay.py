"""What replay, drill and verify know of object streams (`s3:<name>`).

`--until TIME` rebuilds the prefix as it was at TIME: an object version is kept when it
was last modified at or before TIME, a delete marker likewise; a key a listing found gone
(an unversioned bucket has no time for a delete) is deleted when the source saw it gone
at or before TIME (up to `interval_s` after it happened). A replay writes through an
object sink of its own into the bucket prefix `--target-s3` names (endpoint, region and
credentials from the AWS_* environment, like a store URL). A drill replays into a scratch
prefix, which must hold no object, and compares it object by object (key, size, sha256
read back in 1 MiB pieces, content type, user metadata) with the state the kept events
fold into.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from drstream.connectors.s3.objconfig import ObjectSinkConfig
from drstream.connectors.s3.store import S3Store, s3_config_from_url
from drstream.daemon.blobs import BlobStore
from drstream.daemon.codec import Body, EventBatch, KafkaBatch, make_manifest
from drstream.daemon.drill import drill_lines
from drstream.daemon.errors import MISSING, ConfigFieldError, DrstreamError
from drstream.daemon.plugins import (
    ConnectorConfig,
    DrillCheck,
    ReplayOption,
    StreamFilter,
    StreamTraits,
)
from drstream.daemon.tally import EventFilter, EventTally

if TYPE_CHECKING:
    from drstream.daemon.plan import ReplayPlan

TARGET = "--target-s3"
READ_BYTES = 1 << 20  # memory per object checked by a drill


def event_time(ev: Mapping[str, Any]) -> int:
    """When a change happened, as far as the log knows (see the module doc)."""
    lm = ev.get("last_modified_ms")
    return int(lm) if isinstance(lm, int) and lm > 0 else int(ev.get("seen_ms", 0))


def fold(state: dict[str, dict[str, Any]], ev: Mapping[str, Any]) -> None:
    """The prefix after `ev`: key -> what a drill compares."""
    if ev["type"] == "object.deleted":
        state.pop(ev["key"], None)
    else:
        state[ev["key"]] = {"size": ev["size"], "sha256": ev["sha256"],
                            "content_type": ev["content_type"], "metadata": ev["metadata"]}


@dataclass
class ObjectTally(EventTally):
    """Besides the counts (bytes: event JSON plus object sizes): for drills, the prefix
    folded from the kept events."""

    state: dict[str, dict[str, Any]] = field(default_factory=dict)


class ObjectFilter(EventFilter[ObjectTally]):
    """Keeps the object events of the plan's stream that happened up to its time."""

    def __init__(self, plan: ReplayPlan) -> None:
        self.plan = plan
        self.tally = ObjectTally()

    def __call__(self, seq: int, body: Body, created_at_ms: int) -> Body:
        until = self.plan.until_ms
        t = self.tally
        if self.plan.stream in body.manifest.positions and (until is None
                                                            or created_at_ms <= until):
            t.shipped_by(created_at_ms)
        kept: list[dict[str, Any]] = []
        for b in body.batches:
            if isinstance(b, EventBatch) and b.stream == self.plan.stream:
                kept += [ev for ev in b.events if until is None or event_time(ev) <= until]
        for ev in kept:
            t.events += 1
            t.bytes += int(ev.get("size", 0)) + len(json.dumps(ev, separators=(",", ":")))
            if self.plan.fold:
                fold(t.state, ev)
        batches: list[KafkaBatch | EventBatch] = [EventBatch(self.plan.stream, kept)] \
            if kept else []
        return Body(make_manifest(body.manifest.positions, list(batches)), batches)

    def lines(self, plan: ReplayPlan) -> list[str]:
        n = self.tally.events
        return [f"  {plan.option(TARGET)}: {n} object change{'' if n == 1 else 's'}"]


def target_config(plan: ReplayPlan, sink_name: str) -> ObjectSinkConfig:
    url = plan.option(TARGET)
    if not url:
        raise ConfigFieldError(TARGET, MISSING, "name the bucket prefix to write: "
                               "s3://bucket/prefix")
    base = s3_config_from_url(url).model_dump(exclude={"object_lock"})
    try:
        return ObjectSinkConfig.model_validate({**base, "name": sink_name,
                                                "source": plan.stream})
    except ValidationError as e:
        err = e.errors()[0]
        loc = str(err["loc"][0]) if err["loc"] else ""
        option, value = ("--name", plan.name) if loc == "name" else (TARGET, url)
        raise ConfigFieldError(option, value, str(err["msg"])) from None


class ObjectDrill:
    """A drill into a scratch bucket prefix that holds no object."""

    def __init__(self, plan: ReplayPlan, stamp: str, log_id: str) -> None:
        self.plan = dataclasses.replace(plan, name=f"drill-{stamp}", fold=True)
        self.config = target_config(self.plan, f"replay-{self.plan.name}")
        self.target = f"s3://{self.config.bucket}/{self.config.prefix}"
        self.checkpoint_key = self.config.checkpoint_key(log_id)
        self.store = S3Store(self.config, where=TARGET)
        self.report: dict[str, Any] = {"kind": "objects", "stream": plan.stream,
                                       "scratch": self.target}

    async def __aenter__(self) -> ObjectDrill:
        await self.store.start()
        try:
            async for key in self.store.list(""):
                raise DrstreamError(f"drill: the scratch prefix {self.target} already holds "
                                    f"objects (e.g. {key!r}); drill into an empty prefix, "
                                    "never the standby")
        except BaseException:
            await self.store.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.store.close()

    async def compare(self, filt: StreamFilter) -> DrillCheck:
        assert isinstance(filt, ObjectFilter)
        started = time.monotonic()
        want = filt.tally.state
        have = [k async for k in self.store.list("")]
        mismatches: list[dict[str, Any]] = []
        checked = checked_bytes = 0
        for key in sorted(set(want) | set(have)):
            w = want.get(key)
            if w is None or key not in have:
                mismatches.append({"key": key, "field": "object",
                                   "log": "present" if w else "absent",
                                   "target": "absent" if w else "present"})
                continue
            got = await self._read(key)
            checked += 1
            checked_bytes += got["size"]
            mismatches += [{"key": key, "field": f, "log": w[f], "target": got[f]}
                           for f in ("size", "sha256", "content_type", "metadata")
                           if w[f] != got[f]]
        return DrillCheck({"events": filt.tally.events, "objects": checked,
                           "object_bytes": checked_bytes,
                           "verify_s": round(time.monotonic() - started, 3)}, mismatches)

    async def _read(self, key: str) -> dict[str, Any]:
        full = f"{self.config.prefix}/{key}" if self.config.prefix else key

        async def read() -> dict[str, Any]:
            resp = await self.store.client.get_object(Bucket=self.config.bucket, Key=full)
            h, size = hashlib.sha256(), 0
            async with resp["Body"] as body:
                async for piece in body.iter_chunks(READ_BYTES):
                    h.update(piece)
                    size += len(piece)
            return {"size": size, "sha256": h.hexdigest(),
                    "content_type": resp.get("ContentType"),
                    "metadata": dict(resp.get("Metadata") or {})}

        return await self.store.request("get", full, read)

    async def clean(self, filt: StreamFilter | None) -> dict[str, Any]:
        deleted = 0
        async for key in self.store.list(""):
            await self.store.delete(key)
            deleted += 1
        await self.store.request("delete checkpoint", self.checkpoint_key, functools.partial(
            self.store.client.delete_object, Bucket=self.config.bucket,
            Key=self.checkpoint_key))
        return {"deleted_objects": deleted}

    def lines(self, report: dict[str, Any]) -> list[str]:
        return drill_lines(report, lambda r: [
            f"  events                 {r['events']} through seq {r['applied_through_seq']}",
            f"  checked                {r['objects']} objects "
            f"({r['object_bytes'] / 2**20:.2f} MiB by sha256)"],
            lambda m: f"{m['key']!r} {m['field']}: log {m['log']!r} scratch {m['target']!r}",
            kept="change")


class ObjectStreams:
    """The stream kind of the object source (`s3:<name>`)."""

    traits = StreamTraits("s3", "an object stream", "object changes", TARGET,
                          "S3 bucket prefix", "s3:datasets")
    options: tuple[ReplayOption, ...] = (
        ReplayOption(TARGET, "bucket prefix to write an object stream (s3:<name>) to, "
                     "s3://bucket/prefix (endpoint, region and credentials from AWS_*)",
                     "URL", "writes an object stream (s3:<name>)"),
    )

    def blob_refs(self, positions: Any, events: Sequence[Mapping[str, Any]]) -> set[str]:
        """State chunks in the positions, object chunks in the events."""
        refs: set[str] = set()
        if isinstance(positions, dict):
            for name in ("state", "done", "rest"):
                ids = positions.get(name)
                if isinstance(ids, list):
                    refs.update(i for i in ids if isinstance(i, str))
        for ev in events:
            refs.update(c for c in ev.get("chunks") or [] if isinstance(c, str))
        return refs

    async def seed(self, blobs: BlobStore, positions: Any) -> list[dict[str, Any]] | None:
        """The state names objects by ETag, not by blobs: a pruned log cannot rebuild
        the prefix from it."""
        return None

    async def filter(self, plan: ReplayPlan, blobs: BlobStore,
                     first: Callable[[], Awaitable[tuple[int, Any] | None]]) -> ObjectFilter:
        if await first() is not None:
            raise DrstreamError(f"replay: the log was pruned: the object changes of "
                                f"{plan.stream} before its first segment are gone, so the "
                                "prefix cannot be rebuilt from it")
        return ObjectFilter(plan)

    def check(self, plan: ReplayPlan) -> None:
        if plan.option(TARGET):
            target_config(plan, "check")

    def target(self, plan: ReplayPlan, sink_name: str) -> ConnectorConfig:
        return target_config(plan, sink_name)

    def drill(self, plan: ReplayPlan, log_id: str, sinks: Sequence[ConnectorConfig],
              stamp: str) -> ObjectDrill:
        return ObjectDrill(plan, stamp, log_id)
