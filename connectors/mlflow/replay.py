"""What replay, drill and verify need to know about registry streams (`mlflow:<name>`).

Registry events carry no time of their own: `--until TIME` keeps the events of the
segments written (header `created_at_ms`) at or before TIME, the moment the source
observed the change. A replay writes through an MLflow sink of its own into the registry
`--target-mlflow` names. A drill replays into a scratch registry and compares it, model by
model, with the state folded from the log's events (artifact files by sha256 and size).

A pruned log (its first segment is not seq 1) still rebuilds the whole registry: the first
remaining segment's state blob (the full state after it) is turned into the events that
build it from nothing.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from drstream.connectors.mlflow.client import RegistryClient
from drstream.connectors.mlflow.config import MlflowSinkConfig
from drstream.connectors.mlflow.events import (
    CHECKPOINT_MODEL_PREFIX,
    EventError,
    apply_event,
    seed_events,
    validate_event,
)
from drstream.connectors.mlflow.verify import compare_registry, delete_replica, replicated_models
from drstream.daemon.blobs import BlobStore
from drstream.daemon.codec import Body, EventBatch, KafkaBatch, make_manifest
from drstream.daemon.drill import drill_lines
from drstream.daemon.errors import MISSING, ConfigFieldError, DrstreamError
from drstream.daemon.logging import get_logger
from drstream.daemon.plan import ReplayPlan
from drstream.daemon.plugins import (
    ConnectorConfig,
    DrillCheck,
    ReplayOption,
    StreamFilter,
    StreamTraits,
)
from drstream.daemon.secrets import read_secret
from drstream.daemon.tally import EventFilter, EventTally

log = get_logger("drstream.replay")

TARGET = "--target-mlflow"
TOKEN = "--target-mlflow-token"


@dataclass
class RegistryTally(EventTally):
    """Besides the counts (bytes: event JSON plus the artifact files of new versions):
    events per model, and for drills the state folded from the kept events."""

    per_model: dict[str, int] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=lambda: {"models": {}})


class RegistryFilter(EventFilter[RegistryTally]):
    """Keeps the EventBatches of the plan's stream from the segments written up to its
    time; the first segment of a pruned log contributes the seed events instead."""

    def __init__(self, plan: ReplayPlan,
                 seed: tuple[int, list[dict[str, Any]]] | None = None) -> None:
        self.plan = plan
        self.tally = RegistryTally()
        # (seq, events): the first segment of a pruned log, whose events are replaced by
        # the ones that build the state its manifest names from nothing
        self.seed = seed

    def __call__(self, seq: int, body: Body, created_at_ms: int) -> Body:
        until = self.plan.until_ms
        keep = until is None or created_at_ms <= until
        batches: list[KafkaBatch | EventBatch] = []
        if keep and self.plan.stream in body.manifest.positions:
            self.tally.shipped_by(created_at_ms)
        if self.seed is not None and self.seed[0] == seq:
            if keep and self.seed[1]:
                batches.append(EventBatch(self.plan.stream, list(self.seed[1])))
                self._count_events(seq, self.seed[1])
        else:
            for b in body.batches:
                if keep and isinstance(b, EventBatch) and b.stream == self.plan.stream \
                        and b.events:
                    batches.append(EventBatch(b.stream, list(b.events)))
                    self._count_events(seq, b.events)
        positions = body.manifest.positions if keep else {
            s: p for s, p in body.manifest.positions.items() if s != self.plan.stream}
        manifest = make_manifest(positions, list(batches))
        return Body(manifest, list(batches))

    def _count_events(self, seq: int, events: list[dict[str, Any]]) -> None:
        t = self.tally
        t.events += len(events)
        for i, ev in enumerate(events):
            name = str(ev.get("name", ""))
            t.per_model[name] = t.per_model.get(name, 0) + 1
            t.bytes += len(json.dumps(ev, separators=(",", ":")))
            if ev.get("type") == "version.created":
                t.bytes += sum(int(a.get("size", 0)) for a in ev.get("artifacts", []))
            if self.plan.fold:
                try:
                    apply_event(t.state, validate_event(ev))
                except EventError as e:
                    raise EventError(f"log segment seq {seq} event #{i}: {e}") from e

    def lines(self, plan: ReplayPlan) -> list[str]:
        return [f"  {model}: {n} event{'' if n == 1 else 's'}"
                for model, n in sorted(self.tally.per_model.items())]


def _token(plan: ReplayPlan) -> str | None:
    ref = plan.option(TOKEN)
    return read_secret(ref, TOKEN) if ref else None


class RegistryDrill:
    """A drill into a scratch registry, which must hold nothing replicated from the
    stream (a kept drill, a replay, or the live standby itself): the sink would adopt
    such models as its own."""

    def __init__(self, plan: ReplayPlan, target: str, stamp: str, log_id: str) -> None:
        self.target = target
        self.plan = dataclasses.replace(plan, name=f"drill-{stamp}", fold=True)
        sink_name = f"replay-{self.plan.name}"
        self.scratch = {"checkpoint_model": f"{CHECKPOINT_MODEL_PREFIX}{log_id}.{sink_name}",
                        "experiment": f"drstream.{log_id}.{sink_name}"}
        self.report: dict[str, Any] = {"kind": "registry", "stream": plan.stream,
                                       "scratch": self.scratch}
        self._client: RegistryClient | None = None

    @property
    def client(self) -> RegistryClient:
        assert self._client is not None, "use the drill with `async with`"
        return self._client

    async def __aenter__(self) -> RegistryDrill:
        self._client = RegistryClient(self.target, token=_token(self.plan), name="scratch")
        try:
            present = await replicated_models(self.client, self.plan.stream)
        except BaseException:
            await self.__aexit__()
            raise
        if present:
            await self.__aexit__()
            raise DrstreamError(
                f"drill: the scratch registry {self.target} already holds "
                f"{len(present)} model(s) replicated from {self.plan.stream} (e.g. "
                f"{present[0]!r}); drill into an empty registry, never the standby, or delete "
                "them")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def compare(self, filt: StreamFilter) -> DrillCheck:
        assert isinstance(filt, RegistryFilter)
        started = time.monotonic()
        check = await compare_registry(self.client, self.plan.stream, filt.tally.state)
        return DrillCheck({"events": filt.tally.events, "models": check.models,
                           "versions": check.versions, "files": check.files,
                           "file_bytes": check.file_bytes,
                           "verify_s": round(time.monotonic() - started, 3)},
                          check.mismatches)

    async def clean(self, filt: StreamFilter | None) -> dict[str, Any]:
        deleted = await delete_replica(self.client, self.plan.stream,
                                       self.scratch["checkpoint_model"],
                                       self.scratch["experiment"])
        return {"deleted_models": deleted}

    def lines(self, report: dict[str, Any]) -> list[str]:
        return drill_lines(report, lambda r: [
            f"  events                 {r['events']} through seq {r['applied_through_seq']}",
            f"  checked                {r['models']} models, {r['versions']} versions, "
            f"{r['files']} files ({r['file_bytes'] / 2**20:.2f} MiB by sha256)"], _mismatch)


class MlflowStreams:
    """The stream kind of the `mlflow` connector."""

    traits = StreamTraits("mlflow", "a registry stream", "events", TARGET, "MLflow registry",
                          "mlflow:primary")
    options: tuple[ReplayOption, ...] = (
        ReplayOption(TARGET, "MLflow tracking server to write a registry stream "
                     "(mlflow:<name>) to; it must serve artifacts (--serve-artifacts)", "URL",
                     "writes a registry stream (mlflow:<name>)"),
        ReplayOption(TOKEN, "bearer token for --target-mlflow, by reference (env:NAME, "
                     "file:/absolute/path or credential:NAME)", "REF"),
    )

    def blob_refs(self, positions: Any, events: Sequence[Mapping[str, Any]]) -> set[str]:
        """State snapshots in the positions, file chunks in the events (docs/format.md,
        "Registry events")."""
        refs = set()
        if isinstance(positions, dict) and isinstance(positions.get("state_blob"), str):
            refs.add(positions["state_blob"])
        for event in events:
            for art in event.get("artifacts") or []:
                if isinstance(art, dict):
                    refs.update(c for c in art.get("chunks") or [] if isinstance(c, str))
        return refs

    async def seed(self, blobs: BlobStore, positions: Any) -> list[dict[str, Any]] | None:
        found = await seed_events(blobs, positions)
        return None if found is None else found[1]

    async def filter(self, plan: ReplayPlan, blobs: BlobStore,
                     first: Callable[[], Awaitable[tuple[int, Any] | None]]) -> RegistryFilter:
        start = await first()
        if start is None:
            return RegistryFilter(plan)
        seq, positions = start
        found = await seed_events(blobs, positions)
        if found is None:
            return RegistryFilter(plan, (seq, []))
        state, events = found
        log.warning("replay_seeded_from_state", log_id=blobs.log_id, seq=seq,
                    models=len(state["models"]))
        return RegistryFilter(plan, (seq, events))

    def check(self, plan: ReplayPlan) -> None:
        if plan.option(TARGET):
            self.target(plan, "check")
        elif plan.option(TOKEN):
            raise ConfigFieldError(TOKEN, MISSING, f"is the token of the target: give {TARGET}")

    def target(self, plan: ReplayPlan, sink_name: str) -> ConnectorConfig:
        fields = {"type": "mlflow", "name": sink_name, "tracking_uri": plan.option(TARGET),
                  "source": plan.stream, "token": plan.option(TOKEN)}
        try:
            return MlflowSinkConfig.model_validate(fields)
        except ValidationError as e:
            err = e.errors()[0]
            options = {"name": ("--name", plan.name), "token": (TOKEN, None)}
            option, value = options.get(str(err["loc"][0]) if err["loc"] else "",
                                        (TARGET, plan.option(TARGET)))
            raise ConfigFieldError(option, value, str(err["msg"])) from None

    def drill(self, plan: ReplayPlan, log_id: str, sinks: Sequence[ConnectorConfig],
              stamp: str) -> RegistryDrill:
        target = plan.option(TARGET)
        if not target:
            raise ConfigFieldError(TARGET, MISSING, "name a scratch MLflow registry to drill into "
                                   "(an empty one, never the standby: models keep their names)")
        return RegistryDrill(plan, target, stamp, log_id)


def _mismatch(m: dict[str, Any]) -> str:
    where = f"model {m['model']!r}" + (
        f" version {m['version']}" if m["version"] is not None else "")
    return f"{where} {m['field']}: log {m['log']!r} scratch {m['target']!r}"
