"""The drstream config file: one YAML document, typed, unknown keys rejected.

Every validation error names the field path and the bad value
(`store.path: field required (got None)`), and all errors are reported at once.
Connector sections (store, sources, sinks) are validated by the config model that their
connector registered under the section's `type` (daemon.plugins); the config keeps the
connector registry it was validated with, so whatever it builds later uses the same one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    InstanceOf,
    PrivateAttr,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from drstream.daemon.blobs import BlobStore
from drstream.daemon.deltalog import DEFAULT_MAX_IN_FLIGHT, DEFAULT_ZSTD_LEVEL
from drstream.daemon.errors import HIDDEN, MISSING, ConfigError, ConfigFieldError
from drstream.daemon.keyring import KEY_ID_RE
from drstream.daemon.layout import LOG_ID_PATTERN
from drstream.daemon.logging import LogFormat, LogLevel
from drstream.daemon.metrics import DEFAULT_STALL_AFTER_S
from drstream.daemon.outage import DEFAULT_OUTAGE_BUDGET_S
from drstream.daemon.plugins import (
    MAX_SECONDS,
    ConnectorConfig,
    Connectors,
    Context,
    ListenAddress,
    installed,
)
from drstream.daemon.secrets import SECRET_REF_HELP, is_secret_ref
from drstream.daemon.shards import MAX_SHARDS, SUFFIX_MAX, Shard, shard_log_id

LOG_ID_FIELD = rf"^{LOG_ID_PATTERN}$"
KEY_ID_FIELD = rf"^{KEY_ID_RE.pattern}$"

DEFAULT_LOG_LEVEL: LogLevel = "info"
DEFAULT_LOG_FORMAT: LogFormat = "auto"


class Strict(BaseModel):
    # .inf and nan are YAML floats too: no duration or size may be one
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _secret_ref(value: str) -> str:
    if not is_secret_ref(value):
        raise ValueError(f"must be {SECRET_REF_HELP}")
    return value


SecretRef = Annotated[str, AfterValidator(_secret_ref)]
"""A config value naming where a secret lives; the value itself is never echoed."""


class KeyRingConfig(Strict):
    active: str = Field(pattern=KEY_ID_FIELD, description="key id used to encrypt new segments")
    keys: dict[str, SecretRef] = Field(description="key id -> secret reference of a 32-byte key")

    @field_validator("keys")
    @classmethod
    def _ids(cls, keys: dict[str, str]) -> dict[str, str]:
        if not keys:
            raise ValueError("at least one key is required")
        for key_id in keys:
            if not re.match(KEY_ID_FIELD, key_id):
                raise ValueError(f"key id {key_id!r} must match {KEY_ID_FIELD}")
        return keys

    @model_validator(mode="after")
    def _active_known(self) -> KeyRingConfig:
        if self.active not in self.keys:
            raise ValueError(f"active key {self.active!r} is not in keys {sorted(self.keys)}")
        return self


class LoggingConfig(Strict):
    level: LogLevel = DEFAULT_LOG_LEVEL
    format: LogFormat = DEFAULT_LOG_FORMAT


DEFAULT_MAX_BYTES = 1 << 20
# The cut (daemon/pipeline.py): as soon as what was fetched is in the open segment and no
# upload is in flight, but no sooner than DEFAULT_MIN_INTERVAL_S after the previous cut:
# at most 10 segments (PUTs) a second below max_bytes * 10 per second, about 26 M PUTs,
# $131 a month at S3 standard's $0.005 per 1,000 (a steady 5 MB/s fills ~0.5 MB segments).
# A record waits for the next cut: up to 100 ms, 50 on average. min_interval_s 0.02 is the
# low-latency setting: <= 50 PUTs/s, $657 a month, records wait up to 20 ms.
DEFAULT_MIN_INTERVAL_S = 0.1
# The age cap: cut even with an upload in flight once the oldest record waited this long
# (slow PUTs overlap instead of holding records; binds only where min_interval_s is lower).
DEFAULT_FLUSH_INTERVAL_S = 0.05
DEFAULT_HEARTBEAT_INTERVAL_S = 10.0
DEFAULT_BUFFER_MAX_BYTES = 64 << 20
DEFAULT_DRAIN_DEADLINE_S = 30.0


class ShipConfig(Strict):
    """How `ship` cuts and uploads segments."""

    max_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1024, le=256 << 20,
                           description="cut a segment once its records reach this many bytes")
    min_interval_s: float = Field(DEFAULT_MIN_INTERVAL_S, ge=0, le=3600,
                                  description="least time between two cuts (PUTs) below "
                                              "max_bytes: PUTs/s <= 1 / this")
    flush_interval_s: float = Field(DEFAULT_FLUSH_INTERVAL_S, gt=0, le=3600,
                                    description="cut a segment this long after its first "
                                                "record even while an upload is in flight")
    max_in_flight: int = Field(DEFAULT_MAX_IN_FLIGHT, ge=1, le=64)
    heartbeat_interval_s: float = Field(DEFAULT_HEARTBEAT_INTERVAL_S, gt=0, le=86400)
    buffer_max_bytes: int = Field(DEFAULT_BUFFER_MAX_BYTES, ge=1 << 20,
                                  description="consumed but not yet encoded bytes before "
                                              "the source pauses its partitions")
    drain_deadline_s: float = Field(DEFAULT_DRAIN_DEADLINE_S, gt=0, le=MAX_SECONDS)
    zstd_level: int = Field(DEFAULT_ZSTD_LEVEL, ge=-7, le=22)
    upload_retry_deadline_s: float | None = Field(
        None, gt=0, le=MAX_SECONDS,
        description="give up on a segment upload after this long (default: never)"
    )


DEFAULT_APPLY_POLL_MAX_S = 1.0
DEFAULT_GROUP_SYNC_INTERVAL_S = 5.0
DEFAULT_APPLY_PREFETCH = 8
DEFAULT_APPLY_BATCH_MAX_SEGMENTS = 8
DEFAULT_APPLY_BATCH_MAX_BYTES = 32 << 20
DEFAULT_APPLY_TIP_FROM = "auto"


class ApplyConfig(Strict):
    """How `apply` follows the log."""

    poll_max_s: float = Field(DEFAULT_APPLY_POLL_MAX_S, gt=0, le=60,
                              description="longest wait between probes for the next segment")
    prefetch: int = Field(DEFAULT_APPLY_PREFETCH, ge=1, le=64,
                          description="segments fetched ahead while one is applied")
    group_sync_interval_s: float = Field(DEFAULT_GROUP_SYNC_INTERVAL_S, gt=0, le=86400)
    batch_max_segments: int = Field(
        DEFAULT_APPLY_BATCH_MAX_SEGMENTS, ge=1, le=256,
        description="segments already fetched are committed together, up to this many "
                    "(1: one transaction per segment)")
    batch_max_bytes: int = Field(DEFAULT_APPLY_BATCH_MAX_BYTES, ge=1 << 20,
                                 description="stored bytes of segments committed together")
    tip_from: str | None = Field(
        DEFAULT_APPLY_TIP_FROM, pattern=r"^(auto|[^:]*:\d+)$",
        description="host:port of ship's HTTP server, whose /tip stream says when a segment "
                    "is durable (daemon/tip.py); 'auto': service.ship_metrics_listen of this "
                    "config; null: probe the store only; {shard} in the host expands to the "
                    "shard index")


DEFAULT_SHIP_METRICS_LISTEN = "127.0.0.1:9464"
DEFAULT_APPLY_METRICS_LISTEN = "127.0.0.1:9465"


class ServiceConfig(Strict):
    """Running under systemd: metrics/health endpoints and readiness."""

    ship_metrics_listen: ListenAddress | None = Field(
        DEFAULT_SHIP_METRICS_LISTEN,
        description="host:port for /metrics, /healthz, /readyz of ship (null: off)")
    apply_metrics_listen: ListenAddress | None = DEFAULT_APPLY_METRICS_LISTEN
    stall_after_s: float = Field(DEFAULT_STALL_AFTER_S, gt=0, le=MAX_SECONDS,
                                 description="/readyz fails when the main loop is idle this long")
    outage_budget_s: float = Field(
        DEFAULT_OUTAGE_BUDGET_S, gt=0, le=7 * 86_400,
        description="ship and apply retry an unreachable store (and ship its source's first "
                    "scan) this long, not ready meanwhile, before they exit 3")


class ShardsConfig(Strict):
    """A log set (docs/shards.md): `count` ship/apply pairs, shard k shipping the Kafka
    partitions a stable hash assigns to it into its own log `<log_id>-s<k>of<count>`."""

    count: int = Field(1, ge=1, le=MAX_SHARDS, description="shards in the set (1: one log)")
    index: int | None = Field(
        None, ge=0, description="the shard this process runs (ship and apply of a set need "
        "one: here or --shard K); other commands work on every shard unless it is given")
    port_stride: int = Field(
        0, ge=0, le=1000, description="shard k listens at the service ports + k * this "
        "(several shards on one host); 0: the same ports (one shard per host or pod)")

    @model_validator(mode="after")
    def _index_below_count(self) -> ShardsConfig:
        if self.index is not None and self.index >= self.count:
            raise ValueError(f"index {self.index} is not below count {self.count} "
                             f"(shards are 0 .. {self.count - 1})")
        return self


def _shift_port(address: str | None, delta: int) -> str | None:
    """host:port moved by `delta` (port 0, any free port, stays 0)."""
    if address is None or not delta:
        return address
    host, _, port = address.rpartition(":")
    return address if port == "0" else f"{host}:{int(port) + delta}"


# A connector section, already validated by its connector's own model.
Section = SerializeAsAny[InstanceOf[ConnectorConfig]]


class Config(Strict):
    log_id: str = Field(pattern=LOG_ID_FIELD, description="name of this shipper's ordered log")
    store: Section = Field(description="the log store; its keys depend on store.type")
    keyring: KeyRingConfig
    sources: list[Section] = Field(default_factory=list, description="what `ship` reads")
    ship: ShipConfig = Field(default_factory=lambda: ShipConfig.model_validate({}))
    sinks: list[Section] = Field(default_factory=list, description="what `apply` writes")
    apply: ApplyConfig = Field(default_factory=lambda: ApplyConfig.model_validate({}))
    service: ServiceConfig = Field(default_factory=lambda: ServiceConfig.model_validate({}))
    allowed_regions: list[str] | None = Field(
        None, description="data residency: every store and cluster must declare one of these")
    logging: LoggingConfig = LoggingConfig()
    shards: ShardsConfig = Field(default_factory=lambda: ShardsConfig.model_validate({}))
    _connectors: Connectors = PrivateAttr(default_factory=installed)
    _shard: Shard | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _room_for_shard_suffix(self) -> Config:
        if self.shards.count > 1 and len(self.log_id) + SUFFIX_MAX > 128:
            raise ValueError(f"log_id {self.log_id!r} is too long for a set of shards: at most "
                             f"{128 - SUFFIX_MAX} characters (each shard appends -s<k>of<N>)")
        return self

    @property
    def connectors(self) -> Connectors:
        """The connector registry this config was validated with."""
        return self._connectors

    @property
    def shard(self) -> Shard | None:
        """The shard this config runs (for_shard), None for a plain log or a whole set."""
        return self._shard

    def shard_indexes(self) -> list[int]:
        """The shards a command works on: the one selected (shards.index), else every one."""
        if self.shards.index is not None:
            return [self.shards.index]
        return list(range(self.shards.count))

    def for_shard(self, index: int) -> Config:
        """One shard's config: its log id, the sources and sinks it runs (every shard the
        partitioned ones, shard 0 also the rest), its listen ports. A set of one is self."""
        count = self.shards.count
        if count == 1 or self._shard is not None:
            return self
        first = index == 0
        registry = self.connectors
        delta = index * self.shards.port_stride
        tip = self.apply.tip_from
        if tip not in (None, "auto"):
            tip = _shift_port(tip.replace("{shard}", str(index)), delta)
        service = self.service.model_copy(update={
            "ship_metrics_listen": _shift_port(self.service.ship_metrics_listen, delta),
            "apply_metrics_listen": _shift_port(self.service.apply_metrics_listen, delta)})
        out = self.model_copy(update={
            "log_id": shard_log_id(self.log_id, index, count),
            "sources": [s for s in self.sources if first or registry.source_type(s).sharded],
            "sinks": [s for s in self.sinks if first or registry.sink_type(s).sharded],
            "service": service, "apply": self.apply.model_copy(update={"tip_from": tip}),
            "shards": self.shards.model_copy(update={"index": index})})
        out._connectors = registry
        out._shard = Shard(index, count)
        return out

    def tip_address(self) -> str | None:
        """Where apply hears ship's durable tip (apply.tip_from resolved), or None."""
        if self.apply.tip_from == "auto":
            return self.service.ship_metrics_listen
        return self.apply.tip_from

    def context(self, blobs: BlobStore | None = None) -> Context:
        """What every source and sink of this config is built with."""
        return Context(log_id=self.log_id, blobs=blobs,
                       buffer_max_bytes=self.ship.buffer_max_bytes,
                       outage_budget_s=self.service.outage_budget_s, shard=self._shard)


def _fmt_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _field_errors(e: ValidationError, prefix: str = "") -> list[ConfigFieldError]:
    errors = []
    for err in e.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = _fmt_loc(loc)
        if prefix:
            path = prefix if path == "(top level)" else f"{prefix}.{path}"
        reason = str(err["msg"]).removeprefix("Value error, ")
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            reason = "unknown key"
        elif err["type"] == "missing":
            reason, value = "required key is missing", MISSING
        if SECRET_REF_HELP in reason:
            value = HIDDEN
        errors.append(ConfigFieldError(path, value, reason))
    return errors


def _validate_typed(
    path: str, raw: Any, lookup: Callable[[str], Any], every: Callable[[], Iterable[str]]
) -> tuple[ConnectorConfig | None, list[ConfigFieldError]]:
    """Validate a connector section by the model registered under its `type`: `lookup`
    finds that type (loading only its connector), `every` lists them all for an error."""
    if not isinstance(raw, dict):
        return None, [ConfigFieldError(path, raw, "must be a mapping with a 'type' key")]
    name = raw.get("type")
    found = lookup(name) if isinstance(name, str) else None
    if found is None:
        valid = ", ".join(sorted(every()))
        return None, [ConfigFieldError(f"{path}.type", name, f"unknown type; valid: {valid}")]
    try:
        model: type[ConnectorConfig] = found.config_model
        return model.model_validate(raw), []
    except ValidationError as e:
        return None, _field_errors(e, path)


def _validate_connectors(data: dict[str, Any], connectors: Connectors
                         ) -> tuple[dict[str, Any], list[ConfigFieldError]]:
    out: dict[str, Any] = {}
    errors: list[ConfigFieldError] = []
    if "store" in data:
        out["store"], errs = _validate_typed("store", data["store"], connectors.store_named,
                                             lambda: connectors.stores)
        errors += errs
    sections: tuple[tuple[str, Callable[[str], Any], Callable[[], Iterable[str]]], ...] = (
        ("sinks", connectors.sink_named, lambda: connectors.sinks),
        ("sources", connectors.source_named, lambda: connectors.sources),
    )
    for section, lookup, every in sections:
        raw_list = data.get(section, [])
        if not isinstance(raw_list, list):
            errors.append(ConfigFieldError(section, raw_list, "must be a list"))
            continue
        out[section] = []
        for i, raw in enumerate(raw_list):
            model, errs = _validate_typed(f"{section}[{i}]", raw, lookup, every)
            out[section].append(model)
            errors += errs
    return out, errors


def parse_config(data: Any, source: str = "<config>",
                 connectors: Connectors | None = None) -> Config:
    """Validate an already-parsed YAML document against the `connectors` registry (default:
    the installed connectors); raise ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(source, [ConfigFieldError("(top level)", data, "must be a mapping")])
    registry = connectors if connectors is not None else installed()
    sections, errors = _validate_connectors(data, registry)
    try:
        config = Config.model_validate({**data, **sections})
    except ValidationError as e:
        errors += [
            fe for fe in _field_errors(e)
            if not fe.path.startswith(("store", "sources", "sinks"))
        ]
        if "store" not in data:
            errors.append(ConfigFieldError("store", MISSING, "required key is missing"))
        raise ConfigError(source, errors) from None
    errors += _region_errors(config) + _wiring_errors(config)
    if errors:
        raise ConfigError(source, errors)
    config._connectors = registry
    return config


def _wiring_errors(config: Config) -> list[ConfigFieldError]:
    """Names that must be unique (a source's stream, a sink's checkpoint) and sinks that
    apply a stream no source of this config writes (when it has sources: a config
    with only sinks applies a log written elsewhere)."""
    errors = []
    named = (("sources", [s.stream for s in config.sources], config.sources),
             ("sinks", [s.sink_name for s in config.sinks], config.sinks))
    for section, names, items in named:
        seen: dict[str, int] = {}
        for i, (name, item) in enumerate(zip(names, items, strict=True)):
            if name is None:
                continue
            if name in seen:
                errors.append(ConfigFieldError(
                    f"{section}[{i}].name", getattr(item, "name", name),
                    f"{section}[{seen[name]}] has this name too: each must be unique"))
            seen.setdefault(name, i)
    streams = [s.stream for s in config.sources if s.stream is not None]
    if streams:
        for i, sink in enumerate(config.sinks):
            if sink.applies is not None and sink.applies not in streams:
                errors.append(ConfigFieldError(f"sinks[{i}].source", sink.applies,
                                               f"names no source of this config {streams}"))
    return errors


def override_secrets(data: Any, keys: Mapping[str, str],
                     credentials: Mapping[str, str]) -> Any:
    """The parsed YAML with the operator's overrides: `keys` (key id -> reference) replace
    or join the key ring's references, and every `credential:NAME` value anywhere is
    replaced by `credentials[NAME]` (a shell has no $CREDENTIALS_DIRECTORY)."""

    def swap(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        if isinstance(value, str) and value.startswith("credential:"):
            return credentials.get(value.removeprefix("credential:"), value)
        return value

    out = swap(data) if credentials else data
    if keys and isinstance(out, dict) and isinstance(out.get("keyring"), dict):
        ring = out["keyring"]
        out = {**out, "keyring": {**ring, "keys": {**(ring.get("keys") or {}), **keys}}}
    return out


def _region_errors(config: Config) -> list[ConfigFieldError]:
    """The data-residency guard: with allowed_regions set, nothing may be elsewhere or vague."""
    if config.allowed_regions is None:
        return []
    allowed = config.allowed_regions
    sections = [("store", config.store)]
    sections += [(f"sources[{i}]", s) for i, s in enumerate(config.sources)]
    sections += [(f"sinks[{i}]", s) for i, s in enumerate(config.sinks)]
    errors = []
    for path, section in sections:
        region = section.region
        if region not in allowed:
            reason = (f"region is not in allowed_regions {allowed}" if region is not None
                      else f"declares no region; allowed_regions {allowed} requires one")
            errors.append(ConfigFieldError(f"{path}.region", region, reason))
    return errors


class _UniqueKeys(yaml.SafeLoader):
    """YAML where a key given twice in one mapping is an error, not the last one winning
    (`log_id` twice would silently pick one log)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a list or mapping as a key: the config model refuses it
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep)
        return mapping


def read_config_data(path: str | Path) -> Any:
    """The parsed YAML document of a config file (not yet validated)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(str(path), [ConfigFieldError("(file)", str(path), reason)]) from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), [ConfigFieldError(
            "(file)", MISSING, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
            f"{e.start})")]) from None
    try:
        return yaml.load(text, Loader=_UniqueKeys)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else "(file)"
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(
            str(path), [ConfigFieldError(where, MISSING, f"YAML syntax: {problem}")]
        ) from e


def load_config(path: str | Path, connectors: Connectors | None = None, *,
                keys: Mapping[str, str] | None = None,
                credentials: Mapping[str, str] | None = None) -> Config:
    """The config at `path`, with the operator's secret overrides (override_secrets)."""
    data = override_secrets(read_config_data(path), keys or {}, credentials or {})
    return parse_config(data, str(path), connectors)
