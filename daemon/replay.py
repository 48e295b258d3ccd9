"""`replay`, `drill` and `prune`: rebuild state from the log at any point, prove it, trim it.

Replay is apply with a filter and a different sink: records up to a time (by record
timestamp) or through a seq, chosen topics, renamed targets, and its own checkpoint (so an
interrupted replay resumes with no duplicates). A drill replays into scratch topics,
compares them record by record with the log and reports RTO, RPO and mismatches.

Registry streams (`mlflow:<name>`) replay into an MLflow registry. Their events carry no
time of their own: `--until TIME` keeps the events of the segments written (header
`created_at_ms`) at or before TIME, the moment the source observed the change. A registry
drill replays into a scratch registry and compares it, model by model, with the state
folded from the log's events (artifact files by sha256 and size).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from operator import attrgetter
from typing import Any

from daemon.applier import Applier
from daemon.blobs import BlobStore
from daemon.codec import Body, EventBatch, KafkaBatch, make_manifest, update_record_digest
from daemon.config import Config
from daemon.deltalog import DeltaLog
from daemon.errors import ConfigFieldError, DrstreamError
from daemon.keyring import KeyRing
from daemon.logging import get_logger
from daemon.segment import parse_header, read_manifest
from daemon.sink import Checkpoint
from daemon.store import Store

log = get_logger("drstream.replay")

DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time_ms(text: str, field_name: str = "--until") -> int:
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigFieldError(field_name, text, "expected an RFC 3339 time such as "
                               "2026-11-26T12:00:00Z") from None
    if dt.tzinfo is None:
        raise ConfigFieldError(field_name, text, "the time needs a zone (Z or +hh:mm)")
    return int(dt.timestamp() * 1000)


def parse_duration_s(text: str, field_name: str = "--older-than") -> float:
    m = DURATION_RE.match(text.strip())
    if not m:
        raise ConfigFieldError(field_name, text, "expected a duration like 90s, 30m, 12h, 7d")
    return float(m.group(1)) * DURATION_UNITS[m.group(2)]


@dataclass
class ReplayPlan:
    until_ms: int | None = None
    until_seq: int | None = None
    topics: str | None = None  # full-match regex over source topic names
    rename: str = "{topic}"
    name: str = "replay"
    parallel: int = 4
    stream: str = "kafka:primary"
    digests: bool = False  # drills: hash every kept record per partition
    fold: bool = False  # registry drills: fold the kept events into the expected state

    @property
    def registry(self) -> bool:
        return is_registry_stream(self.stream)


def is_registry_stream(stream: str) -> bool:
    return stream.startswith(REGISTRY_STREAM_PREFIX)


REGISTRY_STREAM_PREFIX = "mlflow:"


_key, _value, _timestamp = attrgetter("key"), attrgetter("value"), attrgetter("timestamp")


@dataclass
class PartitionTally:
    records: int = 0
    bytes: int = 0
    newest_ms: int | None = None
    digest: Any = field(default_factory=hashlib.sha256)


@dataclass
class EventTally:
    """What a registry replay kept: events (per model), bytes (event JSON plus the
    artifact files of new versions), the write time of the newest kept segment carrying
    the stream's positions (the registry as the source last saw it), and for drills the
    state folded from the kept events."""

    events: int = 0
    bytes: int = 0
    newest_ms: int | None = None
    per_model: dict[str, int] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=lambda: {"models": {}})


class RecordFilter:
    """The transform replay hands to the applier: keeps what the plan selects (Kafka
    records of the stream, or the EventBatches of a registry stream)."""

    def __init__(self, plan: ReplayPlan) -> None:
        self.plan = plan
        self.topic_re = re.compile(plan.topics) if plan.topics else None
        self.tally: dict[tuple[str, int], PartitionTally] = {}
        self.registry = EventTally()
        # (seq, events): the first segment of a pruned log, whose events are replaced by
        # the ones that build the state its manifest names from nothing
        self.seed: tuple[int, list[dict[str, Any]]] | None = None

    def keep_topic(self, topic: str) -> bool:
        return self.topic_re is None or bool(self.topic_re.fullmatch(topic))

    def __call__(self, seq: int, body: Body, created_at_ms: int | None = None) -> Body:
        if self.plan.registry:
            return self._events(seq, body, created_at_ms)
        until = self.plan.until_ms
        batches: list[KafkaBatch | EventBatch] = []
        for b in body.batches:
            if not isinstance(b, KafkaBatch) or b.stream != self.plan.stream:
                continue
            if not self.keep_topic(b.topic):
                continue
            records = b.records if until is None else [r for r in b.records if r.timestamp <= until]
            if records:
                batches.append(KafkaBatch(b.stream, b.topic, b.partition, records))
                self._count(b.topic, b.partition, records)
        extra = body.manifest.extra.get(self.plan.stream, {})
        topics = {t: m for t, m in extra.get("topics", {}).items() if self.keep_topic(t)}
        kept_extra = {self.plan.stream: {"topics": topics}} if topics else {}
        manifest = make_manifest(body.manifest.positions, list(batches), extra=kept_extra)
        return Body(manifest, list(batches))

    def _events(self, seq: int, body: Body, created_at_ms: int | None) -> Body:
        """Registry events have no time of their own: a segment written after --until
        contributes none of its events (its write time is when the change was seen)."""
        until = self.plan.until_ms
        keep = until is None or created_at_ms is None or created_at_ms <= until
        batches: list[KafkaBatch | EventBatch] = []
        t = self.registry
        if keep and created_at_ms is not None and self.plan.stream in body.manifest.positions:
            # the source had shipped everything it saw up to this segment's write time
            t.newest_ms = created_at_ms if t.newest_ms is None else max(t.newest_ms, created_at_ms)
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
        from connectors.mlflow.events import EventError, apply_event, validate_event

        t = self.registry
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

    def _count(self, topic: str, partition: int, records: list[Any]) -> None:
        # map/filter keep the per-record work in C: this runs for every record replayed
        t = self.tally.get((topic, partition))
        if t is None:
            t = self.tally[(topic, partition)] = PartitionTally()
        t.records += len(records)
        t.bytes += sum(map(len, filter(None, map(_key, records))))
        t.bytes += sum(map(len, filter(None, map(_value, records))))
        newest = max(map(_timestamp, records), default=t.newest_ms)
        if newest is not None:
            t.newest_ms = newest if t.newest_ms is None else max(t.newest_ms, newest)
        if self.plan.digests:
            for r in records:
                update_record_digest(t.digest, r.timestamp, r.key, r.value, r.headers)

    @property
    def records(self) -> int:
        """Kafka records, or registry events, kept so far."""
        return sum(t.records for t in self.tally.values()) + self.registry.events

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.tally.values()) + self.registry.bytes


class DryRunSink:
    """Counts what a replay would write; writes nothing, keeps no checkpoint."""

    name = "dry-run"

    def __init__(self) -> None:
        self._cp = Checkpoint()

    async def start(self) -> Checkpoint:
        return self._cp

    async def apply(self, seq: int, digest: bytes, created_at_ms: int, body: Body) -> None:
        self._cp = Checkpoint(seq=seq, digest=digest, created_at_ms=created_at_ms)

    def checkpoint(self) -> Checkpoint:
        return self._cp

    async def peek(self) -> Checkpoint:
        return self._cp

    async def sync_groups(self, force: bool = False) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        return None


def replay_config(base: Config, plan: ReplayPlan, target_bootstrap: str | None,
                  target_mlflow: str | None = None, target_token: str | None = None) -> Config:
    """The base config with one sink, the replay target (a Kafka cluster or an MLflow
    registry), under its own checkpoint; no sink for a dry run."""
    from pydantic import ValidationError

    sinks: list[Any] = []
    if target_bootstrap is not None:
        from connectors.kafka.config import KafkaSinkConfig

        sinks.append(KafkaSinkConfig.model_validate({
            "type": "kafka", "name": f"replay-{plan.name}", "bootstrap_servers": target_bootstrap,
            "source": plan.stream, "topic_template": plan.rename, "sync_groups": False}))
    if target_mlflow is not None:
        from connectors.mlflow.config import MlflowSinkConfig

        fields = {"type": "mlflow", "name": f"replay-{plan.name}", "tracking_uri": target_mlflow,
                  "source": plan.stream, "token": target_token}
        try:
            sinks.append(MlflowSinkConfig.model_validate(fields))
        except ValidationError as e:
            err = e.errors()[0]
            options = {"name": ("--name", plan.name), "token": ("--target-mlflow-token", None)}
            option, value = options.get(str(err["loc"][0]) if err["loc"] else "",
                                        ("--target-mlflow", target_mlflow))
            raise ConfigFieldError(option, value, str(err["msg"])) from None
    apply = base.apply.model_copy(update={"prefetch": plan.parallel, "poll_max_s": 0.2})
    return base.model_copy(update={"sinks": sinks, "apply": apply})


@dataclass
class ReplayResult:
    through_seq: int
    end_seq: int
    records: int
    bytes: int
    seconds: float
    filter: RecordFilter
    applier: Applier


Progress = Callable[[int, int, int, int, float], None]  # seq, end, records, bytes, elapsed


async def replay(config: Config, store: Store, keyring: KeyRing, plan: ReplayPlan,
                 target_bootstrap: str | None, progress: Progress | None = None,
                 filt: RecordFilter | None = None, *, target_mlflow: str | None = None,
                 target_token: str | None = None) -> ReplayResult:
    """Replay into `target_bootstrap` (Kafka) or `target_mlflow` (a registry); with
    neither, a dry run that only counts."""
    cfg = replay_config(config, plan, target_bootstrap, target_mlflow, target_token)
    applier = Applier(cfg, store, keyring)
    if target_bootstrap is None and target_mlflow is None:
        applier.sinks = [DryRunSink()]
    filt = filt or RecordFilter(plan)
    applier.transform = filt
    if plan.registry:
        filt.seed = await registry_seed(store, keyring, config.log_id, plan.stream)
    head = await DeltaLog(store, config.log_id).head_seq()
    end = min(head or 0, plan.until_seq) if plan.until_seq is not None else (head or 0)
    started = time.monotonic()
    reporter = asyncio.create_task(_report(applier, filt, end, started, progress))
    try:
        last = await applier.run(asyncio.Event(), until_seq=end) if end > 0 else 0
    finally:
        reporter.cancel()
        await applier.close()
    elapsed = time.monotonic() - started
    if progress is not None:
        progress(last, end, filt.records, filt.bytes, elapsed)
    return ReplayResult(last, end, filt.records, filt.bytes, elapsed, filt, applier)


async def registry_seed(store: Store, keyring: KeyRing, log_id: str, stream: str
                        ) -> tuple[int, list[dict[str, Any]]] | None:
    """For a pruned log (first segment > 1): the events that rebuild, from nothing, the
    registry state that the first remaining segment's manifest names (its state blob);
    the events before it are gone, the state after it is not."""
    from connectors.mlflow.events import diff, empty_state, read_state_blob

    log_ = DeltaLog(store, log_id)
    first = await log_.first_seq()
    if first is None or first == 1:
        return None
    data = await log_.fetch(first)
    if data is None:
        raise DrstreamError(f"replay: segment {first} of log {log_id} vanished while starting")
    _, manifest = read_manifest(data, keyring, expect_log_id=log_id, expect_seq=first)
    found = await read_state_blob(BlobStore(store, log_id, keyring),
                                  manifest.positions.get(stream, {}))
    if found is None:
        return first, []
    state = found[1]
    log.warning("replay_seeded_from_state", log_id=log_id, seq=first,
                models=len(state["models"]))
    return first, diff(empty_state(), state)


async def _report(applier: Applier, filt: RecordFilter, end: int, started: float,
                  progress: Progress | None) -> None:
    while progress is not None:
        await asyncio.sleep(1.0)
        progress(applier.progress.applied_seq, end, filt.records, filt.bytes,
                 time.monotonic() - started)


async def drill(config: Config, store: Store, keyring: KeyRing, plan: ReplayPlan,
                target_bootstrap: str, keep: bool, progress: Progress | None = None
                ) -> dict[str, Any]:
    """Replay into scratch topics, compare with the log, report RTO/RPO/mismatches."""
    from connectors.kafka.verify import delete_topics, partition_digests

    if plan.registry:
        raise ConfigFieldError("--stream", plan.stream, "a registry stream drills into a "
                               "scratch registry (--target-mlflow), not a Kafka cluster")
    stamp = _drill_stamp()
    plan.rename, plan.name, plan.digests = "{topic}.drill-" + stamp, "drill-" + stamp, True
    report: dict[str, Any] = {"action": "drill", "log_id": config.log_id, "at_ms": _now_ms(),
                              "target": target_bootstrap, "until_ms": plan.until_ms,
                              "until_seq": plan.until_seq, "scratch_suffix": f".drill-{stamp}"}
    started = time.monotonic()
    filt = RecordFilter(plan)
    try:
        result = await replay(config, store, keyring, plan, target_bootstrap, progress, filt)
    except DrstreamError as e:
        report.update(ok=False, error=str(e), rto_s=round(time.monotonic() - started, 3))
        if not keep:  # what the failed replay wrote so far
            scratch = sorted({plan.rename.format(topic=t) for t, _ in filt.tally})
            await asyncio.to_thread(delete_topics, target_bootstrap, scratch)
        return await _store_report(store, config, report)
    report["rto_s"] = round(result.seconds, 3)
    expected = {(plan.rename.format(topic=t), p): (v.records, v.digest.hexdigest())
                for (t, p), v in result.filter.tally.items()}
    actual = await asyncio.to_thread(partition_digests, target_bootstrap,
                                     sorted({t for t, _ in expected}))
    mismatches = [
        {"topic": t, "partition": p, "log": expected.get((t, p)), "target": actual.get((t, p))}
        for (t, p) in sorted(set(expected) | set(actual))
        if expected.get((t, p), (0, _EMPTY)) != actual.get((t, p), (0, _EMPTY))
    ]
    newest = max((v.newest_ms or 0 for v in result.filter.tally.values()), default=0)
    point = plan.until_ms if plan.until_ms is not None else await _segment_time(
        store, config.log_id, result.through_seq)
    report.update(
        ok=not mismatches, applied_through_seq=result.through_seq, records=result.records,
        partitions=len(expected), mismatches=mismatches,
        rpo_at_point_s=None if not newest or point is None else max(0.0, (point - newest) / 1000),
    )
    if not keep:
        await asyncio.to_thread(delete_topics, target_bootstrap, sorted({t for t, _ in expected}))
    return await _store_report(store, config, report)


_EMPTY = hashlib.sha256().hexdigest()


def _drill_stamp() -> str:
    """Unique per drill: scratch names, transactional id and checkpoint never collide."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.urandom(3).hex()}"


async def drill_registry(config: Config, store: Store, keyring: KeyRing, plan: ReplayPlan,
                         target_mlflow: str, keep: bool, progress: Progress | None = None,
                         target_token: str | None = None) -> dict[str, Any]:
    """Replay a registry stream into a scratch registry, compare it with the state the
    log's events fold into through the drill point, report RTO/RPO/mismatches.

    The scratch registry must hold nothing replicated from the stream (a kept drill, a
    replay, or the live standby itself): the sink would adopt such models as its own."""
    from connectors.mlflow.client import RegistryClient
    from connectors.mlflow.events import CHECKPOINT_MODEL_PREFIX
    from connectors.mlflow.verify import compare_registry, delete_replica, replicated_models
    from daemon.secrets import read_secret

    plan.name, plan.fold = "drill-" + _drill_stamp(), True
    sink_name = f"replay-{plan.name}"
    scratch = {"checkpoint_model": f"{CHECKPOINT_MODEL_PREFIX}{config.log_id}.{sink_name}",
               "experiment": f"drstream.{config.log_id}.{sink_name}"}
    report: dict[str, Any] = {"action": "drill", "kind": "registry", "log_id": config.log_id,
                              "stream": plan.stream, "at_ms": _now_ms(), "target": target_mlflow,
                              "until_ms": plan.until_ms, "until_seq": plan.until_seq,
                              "scratch": scratch}
    token = read_secret(target_token, "--target-mlflow-token") if target_token else None
    async with RegistryClient(target_mlflow, token=token, name="scratch") as client:
        present = await replicated_models(client, plan.stream)
        if present:
            raise DrstreamError(
                f"drill: the scratch registry {target_mlflow} already holds "
                f"{len(present)} model(s) replicated from {plan.stream} (e.g. {present[0]!r});"
                " drill into an empty registry, never the standby, or delete them")
        started = time.monotonic()
        filt = RecordFilter(plan)
        try:
            result = await replay(config, store, keyring, plan, None, progress, filt,
                                  target_mlflow=target_mlflow, target_token=target_token)
        except DrstreamError as e:
            report.update(ok=False, error=str(e), rto_s=round(time.monotonic() - started, 3))
            if not keep:  # what the failed replay wrote so far
                report["deleted_models"] = await delete_replica(
                    client, plan.stream, scratch["checkpoint_model"], scratch["experiment"])
            return await _store_report(store, config, report)
        report["rto_s"] = round(result.seconds, 3)
        verify_started = time.monotonic()
        check = await compare_registry(client, plan.stream, filt.registry.state)
        newest = filt.registry.newest_ms
        point = plan.until_ms if plan.until_ms is not None else await _segment_time(
            store, config.log_id, result.through_seq)
        report.update(
            ok=not check.mismatches, applied_through_seq=result.through_seq,
            records=result.records, events=filt.registry.events, models=check.models,
            versions=check.versions, files=check.files, file_bytes=check.file_bytes,
            verify_s=round(time.monotonic() - verify_started, 3), mismatches=check.mismatches,
            rpo_at_point_s=None if newest is None or point is None
            else max(0.0, (point - newest) / 1000),
        )
        if not keep:
            report["deleted_models"] = await delete_replica(
                client, plan.stream, scratch["checkpoint_model"], scratch["experiment"])
    return await _store_report(store, config, report)


async def _segment_time(store: Store, log_id: str, seq: int) -> int | None:
    data = await DeltaLog(store, log_id).fetch(seq) if seq > 0 else None
    return None if data is None else parse_header(data)[0].created_at_ms


async def _store_report(store: Store, config: Config, report: dict[str, Any]) -> dict[str, Any]:
    key = f"audit/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{report['action']}-" \
          f"{config.log_id}-{os.urandom(4).hex()}.json"
    if not await store.put_if_absent(key, json.dumps(report, indent=2, default=str).encode()):
        raise DrstreamError(f"audit object {key} already exists; report not stored")
    report["audit_object"] = key
    return report


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class PruneResult:
    first_seq: int | None
    head_seq: int | None
    keep_from: int | None
    deleted: list[int] = field(default_factory=list)
    kept_reason: str = ""
    locked: list[int] = field(default_factory=list)


async def prune(config: Config, store: Store, older_than_s: float, *,
                dry_run: bool = False) -> PruneResult:
    """Delete the oldest segments written before now - older_than_s, as a prefix only
    (the log stays contiguous), never the head (it holds the newest position map), never
    one a sink has not applied yet (nor the one it applied last: apply re-reads it to
    check the chain on restart), never one still under Object Lock retention."""
    from daemon.ops import peek_checkpoints

    log_ = DeltaLog(store, config.log_id)
    first, head = await log_.first_seq(), await log_.head_seq()
    result = PruneResult(first, head, None)
    if first is None or head is None:
        result.kept_reason = "log is empty"
        return result
    keep_from, why = head, "the head holds the newest positions"
    for name, cp in (await peek_checkpoints(config)).items():
        if max(cp.seq, 1) < keep_from:
            keep_from, why = max(cp.seq, 1), f"{name} has applied through seq {cp.seq}"
    result.keep_from = keep_from
    cutoff_ms = _now_ms() - older_than_s * 1000
    lock_days = getattr(getattr(config.store, "object_lock", None), "retain_days", None)
    for seq in range(first, keep_from):
        data = await log_.fetch(seq)
        created = parse_header(data)[0].created_at_ms if data else None
        if created is None or created >= cutoff_ms:
            why = f"seq {seq} is newer than the cutoff"
            break
        if lock_days is not None and created + lock_days * 86_400_000 > _now_ms():
            result.locked.append(seq)
            why = f"seq {seq} is under Object Lock retention ({lock_days} days)"
            break
        if not dry_run:
            await store.delete(log_.key(seq))
        result.deleted.append(seq)
    result.kept_reason = why
    log.info("prune_done", log_id=config.log_id, deleted=len(result.deleted), reason=why)
    return result
