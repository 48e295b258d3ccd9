"""What replay, drill and verify need to know about Kafka streams (`kafka:<cluster>`).

A replay keeps the records of the stream's chosen topics (`--topics`, a full-match regex)
with timestamps up to `--until`, and writes them through a Kafka sink of its own into the
cluster `--target-bootstrap` names, under `--rename`d topics. A drill writes into scratch
topics `<topic>.drill-<stamp>` and compares each partition's count and checksum with the
records the log holds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from pydantic import ValidationError

from drstream.connectors.kafka.common import SOURCE_OFFSET_HEADER
from drstream.connectors.kafka.config import DEFAULT_TOPIC_TEMPLATE, KafkaSinkConfig
from drstream.connectors.kafka.verify import delete_topics, partition_digests, reachable
from drstream.daemon.blobs import BlobStore
from drstream.daemon.codec import (
    Body,
    KafkaBatch,
    KafkaRecord,
    make_manifest,
    update_record_digest,
)
from drstream.daemon.drill import drill_lines
from drstream.daemon.errors import HIDDEN, MISSING, ConfigFieldError
from drstream.daemon.plan import ReplayPlan, parse_assignments
from drstream.daemon.plugins import (
    ConnectorConfig,
    DrillCheck,
    ReplayOption,
    StreamFilter,
    StreamTraits,
)
from drstream.daemon.records import ProduceBatch

TARGET = "--target-bootstrap"
TOPICS = "--topics"
RENAME = "--rename"
PROPERTY = "--target-property"
SECRET_PROPERTY = "--target-secret-property"
# what each target sink field is called on the command line, in errors
_OPTION_OF_FIELD = {"bootstrap_servers": TARGET, "topic_template": RENAME,
                    "properties": PROPERTY, "secret_properties": SECRET_PROPERTY}
_EMPTY = hashlib.sha256().hexdigest()
_key, _value, _timestamp = attrgetter("key"), attrgetter("value"), attrgetter("timestamp")


@dataclass
class PartitionTally:
    records: int = 0
    bytes: int = 0
    newest_ms: int | None = None
    digest: Any = field(default_factory=hashlib.sha256)


def _topics_re(plan: ReplayPlan) -> re.Pattern[str] | None:
    topics = plan.option(TOPICS)
    try:
        return re.compile(topics) if topics else None
    except re.error as e:
        raise ConfigFieldError(TOPICS, topics, f"not a regular expression: {e}") from None


def _rename(plan: ReplayPlan) -> str:
    """The --rename template, checked: only {topic} and {cluster} expand."""
    rename = plan.option(RENAME, DEFAULT_TOPIC_TEMPLATE) or DEFAULT_TOPIC_TEMPLATE
    try:
        rename.format(topic="t", cluster="c")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigFieldError(RENAME, rename, f"only {{topic}} and {{cluster}} may appear "
                               f"in braces ({type(e).__name__}: {e})") from None
    return rename


class KafkaFilter:
    """Keeps the records of the plan's stream and topics up to its time; tallies them per
    source partition (and, for drills, a checksum of each partition's records)."""

    def __init__(self, plan: ReplayPlan) -> None:
        self.plan = plan
        self.topic_re = _topics_re(plan)
        self.rename = _rename(plan)
        self.tally: dict[tuple[str, int], PartitionTally] = {}
        # Kafka sinks that open segments themselves hand this filter bodies decoded as
        # produce() arguments (ProduceBatch), with timestamps clamped to >= 0: a drill's
        # checksums and an --until before 1970 need the records
        self.produce_form = not plan.digests and (plan.until_ms is None or plan.until_ms >= 0)

    def keep_topic(self, topic: str) -> bool:
        return self.topic_re is None or bool(self.topic_re.fullmatch(topic))

    def __call__(self, seq: int, body: Body, created_at_ms: int) -> Body:
        until = self.plan.until_ms
        batches: list[KafkaBatch | ProduceBatch] = []
        for b in body.batches:
            if not isinstance(b, KafkaBatch | ProduceBatch) or b.stream != self.plan.stream:
                continue
            if not self.keep_topic(b.topic):
                continue
            if isinstance(b, ProduceBatch):
                kept = self._until_columns(b, until)
                if len(kept):
                    batches.append(kept)
                    self._count_columns(kept)
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

    @staticmethod
    def _until_columns(b: ProduceBatch, until: int | None) -> ProduceBatch:
        """The records of `b` up to `until`. Its timestamps are clamped to >= 0 (a record
        without one has 0), which compares with an `until` >= 0 as -1 would."""
        if until is None or max(b.timestamps, default=0) <= until:
            return b
        keep = [i for i, ts in enumerate(b.timestamps) if ts <= until]
        return b.select(keep, SOURCE_OFFSET_HEADER)

    def _tally(self, topic: str, partition: int) -> PartitionTally:
        t = self.tally.get((topic, partition))
        if t is None:
            t = self.tally[(topic, partition)] = PartitionTally()
        return t

    def _count_columns(self, b: ProduceBatch) -> None:
        t = self._tally(b.topic, b.partition)
        t.records += len(b)
        t.bytes += sum(map(len, filter(None, b.keys))) + sum(map(len, filter(None, b.values)))
        newest = max(b.timestamps)
        t.newest_ms = newest if t.newest_ms is None else max(t.newest_ms, newest)

    def _count(self, topic: str, partition: int, records: list[KafkaRecord]) -> None:
        # map/filter keep the per-record work in C: this runs for every record replayed
        t = self._tally(topic, partition)
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
    def count(self) -> int:
        return sum(t.records for t in self.tally.values())

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.tally.values())

    @property
    def newest_ms(self) -> int | None:
        return max((v.newest_ms or 0 for v in self.tally.values()), default=0) or None

    def target_topic(self, topic: str) -> str:
        return self.rename.format(topic=topic, cluster=self.plan.stream.split(":")[-1])

    def lines(self, plan: ReplayPlan) -> list[str]:
        return [f"  {self.target_topic(topic)}[{p}]: {t.records} records"
                for (topic, p), t in sorted(self.tally.items())]


class KafkaDrill:
    """A drill into scratch topics `<topic>.drill-<stamp>` of one cluster."""

    def __init__(self, plan: ReplayPlan, cluster: KafkaSinkConfig, stamp: str) -> None:
        self.target = cluster.bootstrap_servers
        self.cluster = cluster  # its address, properties and secrets
        self.suffix = f".drill-{stamp}"
        options = {**plan.options, RENAME: "{topic}" + self.suffix, TARGET: self.target,
                   PROPERTY: tuple(f"{k}={v}" for k, v in cluster.properties.items()),
                   SECRET_PROPERTY: tuple(f"{k}={v}"
                                          for k, v in cluster.secret_properties.items())}
        self.plan = dataclasses.replace(plan, name=f"drill-{stamp}", options=options,
                                        digests=True)
        self.report: dict[str, Any] = {"scratch_suffix": self.suffix}

    async def __aenter__(self) -> KafkaDrill:
        # a target that does not answer fails the drill before anything is replayed
        await asyncio.to_thread(reachable, self.cluster, self.cluster.connect_timeout_s)
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def _scratch(self, topic: str) -> str:
        return topic + self.suffix

    async def compare(self, filt: StreamFilter) -> DrillCheck:
        assert isinstance(filt, KafkaFilter)
        expected = {(self._scratch(t), p): (v.records, v.digest.hexdigest())
                    for (t, p), v in filt.tally.items()}
        actual = await asyncio.to_thread(partition_digests, self.cluster,
                                         sorted({t for t, _ in expected}))
        mismatches = [
            {"topic": t, "partition": p, "log": expected.get((t, p)),
             "target": actual.get((t, p))}
            for (t, p) in sorted(set(expected) | set(actual))
            if expected.get((t, p), (0, _EMPTY)) != actual.get((t, p), (0, _EMPTY))
        ]
        return DrillCheck({"partitions": len(expected)}, mismatches)

    async def clean(self, filt: StreamFilter | None) -> dict[str, Any]:
        if isinstance(filt, KafkaFilter):
            scratch = sorted({self._scratch(t) for t, _ in filt.tally})
            await asyncio.to_thread(delete_topics, self.cluster, scratch)
        return {}

    def lines(self, report: dict[str, Any]) -> list[str]:
        return drill_lines(report, lambda r: [
            f"  records                {r['records']} in {r['partitions']} partitions, "
            f"through seq {r['applied_through_seq']}"],
            lambda m: f"{m['topic']}[{m['partition']}]: log {m['log']} target {m['target']}",
            most=10)


class KafkaStreams:
    """The stream kind of the `kafka` connector."""

    traits = StreamTraits("kafka", "a Kafka stream", "records", TARGET, "Kafka cluster",
                          "kafka:primary")
    options: tuple[ReplayOption, ...] = (
        ReplayOption(TARGET, "Kafka cluster to write to", "HOST:PORT", "writes a Kafka stream"),
        ReplayOption(TOPICS, "only source topics fully matching this", "REGEX",
                     "selects Kafka topics"),
        ReplayOption(RENAME, "target topic name, e.g. '{topic}.restored'", "TEMPLATE",
                     "renames Kafka topics", DEFAULT_TOPIC_TEMPLATE),
        ReplayOption(PROPERTY, "a librdkafka property of the target cluster, e.g. "
                     "security.protocol=SASL_SSL (repeatable; as `properties` in the config)",
                     "KEY=VALUE", "configures a Kafka client", repeat=True),
        ReplayOption(SECRET_PROPERTY, "a librdkafka property whose value is a secret, by "
                     "reference, e.g. sasl.password=env:KAFKA_PASSWORD (repeatable; as "
                     "`secret_properties` in the config)", "KEY=REF",
                     "configures a Kafka client", repeat=True),
    )

    def blob_refs(self, positions: Any, events: Sequence[Mapping[str, Any]]) -> set[str]:
        return set()

    async def seed(self, blobs: BlobStore, positions: Any) -> list[dict[str, Any]] | None:
        return None

    async def filter(self, plan: ReplayPlan, blobs: BlobStore,
                     first: Callable[[], Awaitable[tuple[int, Any] | None]]) -> KafkaFilter:
        return KafkaFilter(plan)

    def check(self, plan: ReplayPlan) -> None:
        _topics_re(plan)
        _rename(plan)
        if plan.option(TARGET):
            self.target(plan, "check")
        elif plan.values(PROPERTY) or plan.values(SECRET_PROPERTY):
            flag = PROPERTY if plan.values(PROPERTY) else SECRET_PROPERTY
            raise ConfigFieldError(flag, MISSING, f"configures the target cluster: give {TARGET}")

    def target(self, plan: ReplayPlan, sink_name: str) -> KafkaSinkConfig:
        fields = {
            "type": "kafka", "name": sink_name, "bootstrap_servers": plan.option(TARGET),
            "source": plan.stream, "topic_template": _rename(plan), "sync_groups": False,
            "properties": parse_assignments(plan.values(PROPERTY), PROPERTY),
            "secret_properties": parse_assignments(plan.values(SECRET_PROPERTY),
                                                   SECRET_PROPERTY, secret=True)}
        try:
            return KafkaSinkConfig.model_validate(fields)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            loc = str(err["loc"][0]) if err["loc"] else ""
            option = _OPTION_OF_FIELD.get(loc, TARGET)
            value = HIDDEN if option == SECRET_PROPERTY else err.get("input")
            raise ConfigFieldError(option, value,
                                   str(err["msg"]).removeprefix("Value error, ")) from None

    def drill(self, plan: ReplayPlan, log_id: str, sinks: Sequence[ConnectorConfig],
              stamp: str) -> KafkaDrill:
        """Into `--target-bootstrap` (with the options' properties), or by default into
        the cluster of the config's first Kafka sink, with that sink's properties."""
        if plan.option(TARGET):
            return KafkaDrill(plan, self.target(plan, "drill"), stamp)
        sink = next((s for s in sinks if isinstance(s, KafkaSinkConfig)), None)
        if sink is None:
            raise ConfigFieldError(TARGET, MISSING, "no Kafka sink in the config to drill against")
        return KafkaDrill(plan, sink, stamp)
