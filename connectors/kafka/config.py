"""Typed config of the Kafka connector (source side; the sink joins it with `apply`)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from drstream.connectors.kafka.common import combined_error, property_errors
from drstream.daemon.plugins import ConnectorConfig, SinkConfig
from drstream.daemon.secrets import SECRET_REF_HELP, is_secret_ref

DEFAULT_DISCOVERY_INTERVAL_S = 5.0
DEFAULT_CONNECT_TIMEOUT_S = 15.0
DEFAULT_CONSUME_BATCH = 2000
MAX_CONNECT_TIMEOUT_S = 3600.0
# Internal topics are never replicated, whatever the include list says.
ALWAYS_EXCLUDED = (r"__.*", r"_confluent.*", r"drstream\..*")


def _check_regexes(patterns: list[str]) -> list[str]:
    for i, pattern in enumerate(patterns):
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"[{i}] {pattern!r} is not a valid regular expression: {e}") from e
    return patterns


def _check_secret_refs(props: dict[str, str]) -> dict[str, str]:
    for key, ref in props.items():
        if not is_secret_ref(ref):
            raise ValueError(f"{key} must be {SECRET_REF_HELP}")
    return props


class Selection(BaseModel):
    """Names chosen by full-match regexes: included and not excluded."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)

    @field_validator("include", "exclude")
    @classmethod
    def _regexes(cls, patterns: list[str]) -> list[str]:
        return _check_regexes(patterns)

    def matches(self, name: str) -> bool:
        if any(re.fullmatch(p, name) for p in self.exclude):
            return False
        return any(re.fullmatch(p, name) for p in self.include)


class _Cluster(ConnectorConfig):
    """What the source and the sink config say alike: how to reach a cluster."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["kafka"]
    region: str | None = Field(None, description="where the cluster runs (allowed_regions)")
    bootstrap_servers: str = Field(min_length=1)
    connect_timeout_s: float = Field(DEFAULT_CONNECT_TIMEOUT_S, gt=0, le=MAX_CONNECT_TIMEOUT_S)
    properties: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="extra librdkafka properties (security, tuning)")
    secret_properties: dict[str, str] = Field(
        default_factory=dict, description="librdkafka properties whose values are secrets, "
        "by reference (e.g. sasl.password: env:KAFKA_PASSWORD)")

    @field_validator("properties")
    @classmethod
    def _known(cls, props: dict[str, str | int | float | bool]
               ) -> dict[str, str | int | float | bool]:
        errors = property_errors(props, secret=False)
        if errors:
            raise ValueError("; ".join(errors))
        return props

    @field_validator("secret_properties")
    @classmethod
    def _refs(cls, props: dict[str, str]) -> dict[str, str]:
        errors = property_errors(props, secret=True)
        if errors:
            raise ValueError("; ".join(errors))
        return _check_secret_refs(props)

    @model_validator(mode="after")
    def _together(self) -> _Cluster:
        reason = combined_error(self.properties, self.secret_properties)
        if reason is not None:
            raise ValueError(f"properties and secret_properties together: {reason}")
        return self


class KafkaSourceConfig(_Cluster):
    name: str = Field("primary", pattern=r"^[A-Za-z0-9._-]{1,64}$",
                      description="cluster name; the stream is 'kafka:<name>'")
    topics: Selection
    groups: Selection = Selection()
    start_from: str = Field("earliest", description="earliest | latest | an RFC 3339 time, "
                            "used only for partitions the log has no position for")
    group_id: str | None = Field(None, description="consumer group for visibility commits "
                                 "(default drstream-<log_id>); never read back")
    discovery_interval_s: float = Field(DEFAULT_DISCOVERY_INTERVAL_S, gt=0, le=86400)
    consume_batch: int = Field(DEFAULT_CONSUME_BATCH, ge=1, le=100_000)
    skip_origins: list[str] = Field(
        default_factory=lambda: ["*"], description="records that drstream applied from these "
        "clusters (drstream.origin header) are not shipped back; '*' = any, [] = none")

    @field_validator("topics")
    @classmethod
    def _some_topics(cls, topics: Selection) -> Selection:
        if not topics.include:
            raise ValueError("topics.include needs at least one regex (e.g. '.*')")
        return topics

    @field_validator("start_from")
    @classmethod
    def _start(cls, value: str) -> str:
        if value not in ("earliest", "latest"):
            try:
                zone = datetime.fromisoformat(value).tzinfo
            except ValueError:
                raise ValueError("must be earliest, latest or an RFC 3339 time") from None
            if zone is None:
                raise ValueError("the time needs a zone (Z or +hh:mm): without one it would "
                                 "be read in the host's local time")
        return value

    @property
    def stream(self) -> str:
        return f"kafka:{self.name}"

    def start_timestamp_ms(self) -> int | None:
        if self.start_from in ("earliest", "latest"):
            return None
        return int(datetime.fromisoformat(self.start_from).timestamp() * 1000)


KafkaStart = Literal["earliest", "latest"]


DEFAULT_CHECKPOINT_TOPIC = "drstream.checkpoints"
DEFAULT_TOPIC_TEMPLATE = "{topic}"


class KafkaSinkConfig(_Cluster, SinkConfig):
    """The standby cluster that `apply` writes to, one transaction per segment."""

    name: str = Field("standby", pattern=r"^[A-Za-z0-9._-]{1,64}$",
                      description="this cluster's name (origin header, checkpoints)")
    source: str = Field("kafka:primary", description="the stream in the log to apply")
    topic_template: str = Field(DEFAULT_TOPIC_TEMPLATE,
                                description="target topic name; {topic} and {cluster} expand")
    checkpoint_topic: str = Field(DEFAULT_CHECKPOINT_TOPIC)
    transactional_id: str | None = Field(None, description="default drstream-apply-<log_id>-"
                                         "<name>; a second apply with it is fenced")
    replication_factor: int = Field(-1, description="for created topics; -1: broker default")
    sync_groups: bool = Field(True, description="commit translated consumer-group offsets "
                              "for groups with no active members on this cluster")
    transaction_timeout_s: float = Field(60.0, gt=0, le=MAX_CONNECT_TIMEOUT_S)

    @field_validator("topic_template")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            value.format(topic="t", cluster="c")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"only {{topic}} and {{cluster}} may appear: {e}") from None
        return value

    def target_topic(self, topic: str, cluster: str) -> str:
        return self.topic_template.format(topic=topic, cluster=cluster)
