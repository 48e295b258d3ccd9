"""How the core finds its connectors and what it may ask of them.

A connector is a package that offers some of: a store type, a source type, a sink type,
and the stream capabilities that replay, drill, verify and prune need for the streams its
source writes (`<connector>:<name>`). Installed connectors are found through the entry
points of group `drstream.connectors` (each names a `Connector`), loaded once and handed
to the core as a `Connectors` registry: the core imports no connector, and a new store or
source type is a new package plus one entry point.

What the core hands a connector it builds is one typed `Context` (never loose keyword
arguments), and what it reads back is typed by the protocols below.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Annotated, Any, Generic, Protocol, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict

from drstream.daemon.codec import Body
from drstream.daemon.errors import ConfigFieldError, DrstreamError
from drstream.daemon.outage import DEFAULT_OUTAGE_BUDGET_S
from drstream.daemon.sink import Sink
from drstream.daemon.source import Source
from drstream.daemon.store import Store

if TYPE_CHECKING:
    from drstream.daemon.blobs import BlobStore
    from drstream.daemon.plan import ReplayPlan
    from drstream.daemon.shards import Shard

ENTRY_POINT_GROUP = "drstream.connectors"

# The longest duration any config field may hold: beyond it a value is a typo (1e308,
# seconds meant as milliseconds), and timers and client libraries overflow on it.
MAX_SECONDS = 7 * 86400.0


def _listen_address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be host:port with a port from 0 to 65535 (0: any free port)")
    return value


ListenAddress = Annotated[str, AfterValidator(_listen_address)]
"""host:port to listen on."""


class ConnectorConfig(BaseModel):
    """What the core reads of any connector's config section; the connector's own model
    (registered with its type) adds and checks everything else."""

    # .inf and nan are YAML floats too: no duration or size may be one
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: str
    region: str | None = None  # where it runs, for the allowed_regions guard

    @property
    def stream(self) -> str | None:
        """A source section: the stream it writes into the log ("kafka:primary")."""
        return None

    @property
    def applies(self) -> str | None:
        """A sink section: the stream of the log it applies."""
        return None

    @property
    def sink_name(self) -> str | None:
        """A sink section: the name its checkpoint is kept under ("kafka:standby")."""
        return None


class SinkConfig(ConnectorConfig):
    """A sink section: its checkpoint is kept under "<type>:<name>", and it applies the
    log's stream `source`; the connector's model gives both their defaults."""

    name: str
    source: str

    @property
    def applies(self) -> str:
        return self.source

    @property
    def sink_name(self) -> str:
        return f"{self.type}:{self.name}"


C = TypeVar("C", bound=ConnectorConfig)


@dataclass(frozen=True)
class Context:
    """What the core hands every source and sink it builds."""

    log_id: str
    blobs: BlobStore | None = None  # the log's blobs (artifact chunks, state snapshots)
    buffer_max_bytes: int = 0  # sources: consumed but unencoded bytes before pausing
    # how long to retry a source that cannot be reached at start before giving up
    outage_budget_s: float = DEFAULT_OUTAGE_BUDGET_S
    # the shard of a log set this source ships (a partitioned source reads only the
    # partitions it owns); None: not sharded
    shard: Shard | None = None


@dataclass(frozen=True)
class StoreType(Generic[C]):
    name: str
    config_model: type[C]
    open: Callable[[C], Store]  # an unopened store: use it with `async with`
    from_url: Callable[[str], C]
    schemes: tuple[str, ...]
    # days a written object cannot be deleted (Object Lock), None when unlimited
    retain_days: Callable[[C], int | None] = lambda _config: None


@dataclass(frozen=True)
class SourceType(Generic[C]):
    name: str
    config_model: type[C]
    factory: Callable[[C, Context], Source]
    # config keys that re-point the source: a reload that changes them needs a restart
    restart_fields: tuple[str, ...] = ()
    # its stream is split over the shards of a log set by (topic, partition); False: the
    # whole stream is shipped by shard 0 (docs/shards.md)
    sharded: bool = False


@dataclass(frozen=True)
class SinkType(Generic[C]):
    name: str
    config_model: type[C]
    factory: Callable[[C, Context], Sink]
    sharded: bool = False  # applies a sharded stream: runs in every shard, else in shard 0


@dataclass(frozen=True)
class ReplayOption:
    """A command-line option of `replay` and `drill` that a stream kind understands."""

    flag: str  # "--topics"
    help: str
    metavar: str | None = None
    why: str = ""  # what it does, said when it is given for another kind's stream
    default: str | None = None  # the value that counts as "not given"
    repeat: bool = False  # may be given several times (its values are a tuple)


class StreamFilter(Protocol):
    """Replay's view of one stream: keeps what the plan selects from each decoded segment
    (the applier's transform) and tallies what was kept."""

    def __call__(self, seq: int, body: Body, created_at_ms: int) -> Body: ...

    @property
    def count(self) -> int:
        """Records (or events) kept so far."""
        ...

    @property
    def bytes(self) -> int: ...

    @property
    def newest_ms(self) -> int | None:
        """Time of the newest change kept (for the RPO at the drill point)."""
        ...

    def lines(self, plan: ReplayPlan) -> list[str]:
        """Per-target lines of the replay report ("  orders[0]: 12 records")."""
        ...


@dataclass
class DrillCheck:
    """What a drill compared in its scratch target: report fields and mismatches."""

    fields: dict[str, Any]
    mismatches: list[dict[str, Any]]


class Drill(Protocol):
    """One drill of a stream into a scratch target (scratch topics, a scratch registry).
    Entering it connects and refuses a target that cannot serve as scratch."""

    target: str
    plan: ReplayPlan  # the replay it runs: scratch names, the tallies it compares
    report: dict[str, Any]  # kind-specific fields of the stored report

    async def __aenter__(self) -> Drill: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def compare(self, filt: StreamFilter) -> DrillCheck: ...

    async def clean(self, filt: StreamFilter | None) -> dict[str, Any]:
        """Remove what the replay wrote (without --keep); report fields it adds."""
        ...

    def lines(self, report: dict[str, Any]) -> list[str]:
        """The kind's lines of the report for a person."""
        ...


@dataclass(frozen=True)
class StreamTraits:
    """How a kind of stream is named to people and on the command line."""

    name: str  # the connector's name: its streams are `<name>:<source name>`
    noun: str  # "a Kafka stream", in messages
    unit: str  # what its changes are called in reports: "records", "events"
    target_option: str  # the replay option that names where to write
    target_noun: str  # what that option names: "Kafka cluster"
    default_stream: str  # the stream a replay with target_option reads by default


class StreamKind(Protocol):
    """What the core asks of the connector whose source writes streams `<name>:...`."""

    traits: StreamTraits
    options: tuple[ReplayOption, ...]  # its replay options, the target option first

    def blob_refs(self, positions: Any, events: Sequence[Mapping[str, Any]]) -> set[str]:
        """Blob ids a segment names through this stream's positions and events."""
        ...

    async def seed(self, blobs: BlobStore, positions: Any) -> list[dict[str, Any]] | None:
        """For a pruned log: the changes that rebuild, from nothing, what `positions` of its
        first remaining segment name (None: the stream's changes cannot be rebuilt so)."""
        ...

    async def filter(self, plan: ReplayPlan, blobs: BlobStore,
                     first: Callable[[], Awaitable[tuple[int, Any] | None]]) -> StreamFilter:
        """The replay filter; `first()` reads (seq, this stream's positions) of the oldest
        stored segment when the log was pruned (None when it was not)."""
        ...

    def check(self, plan: ReplayPlan) -> None:
        """Refuse, before anything is read, options of the plan that cannot work (a bad
        regex or template, a malformed property): ConfigFieldError naming the option."""
        ...

    def target(self, plan: ReplayPlan, sink_name: str) -> ConnectorConfig:
        """The sink config replay writes through (raises ConfigFieldError naming the
        option at fault)."""
        ...

    def drill(self, plan: ReplayPlan, log_id: str, sinks: Sequence[ConnectorConfig],
              stamp: str) -> Drill:
        """A drill of the plan's stream in log `log_id`; `sinks` are the config's (a
        default target); `stamp` makes its scratch names unique. Raises ConfigFieldError
        naming the option that is missing."""
        ...


@dataclass(frozen=True)
class BenchSpec:
    """What `drstream bench` asks for: records per second for `seconds`, each carrying
    about `record_bytes` of payload, over `partitions` partitions of a source object of its
    own named `name` (None: the connector names it)."""

    rate: float
    seconds: float
    record_bytes: int
    partitions: int
    name: str | None = None


class BenchLoad(Protocol):
    """`drstream bench` through a running ship and apply: stamped records written where a
    source reads, read back where its sink writes. `produce` and `read` block (the core
    runs them on threads); record ids count from 0 in produce order."""

    target: str  # what is written where, for people ("topic t on A -> topic t on B")
    stream: str  # the log stream the records travel in

    def prepare(self, timeout_s: float) -> None:
        """Create the bench's own object on the source side and wait until the running
        ship and apply have made it on the sink side (DrstreamError when they do not)."""
        ...

    def produce(self, spec: BenchSpec, stop: threading.Event) -> None:
        """Write spec.rate records a second for spec.seconds (or until `stop`)."""
        ...

    def read(self, stop: threading.Event) -> None:
        """Record each record's first arrival on the sink side until `stop`."""
        ...

    def produced_ns(self) -> Sequence[int]:
        """Per id: when it was produced (wall clock ns), 0 if its write failed."""
        ...

    def arrival_ns(self) -> Sequence[int]:
        """Per id: when it was first read on the sink side (wall clock ns), 0 if not yet."""
        ...

    def counts(self) -> dict[str, int]:
        """sent, acked, failed, arrived, duplicates, unknown (read but never produced)."""
        ...

    def take_window(self) -> list[float]:
        """Lags (ms) of the records that arrived since the last call (progress lines)."""
        ...

    def covered(self, positions: Any) -> list[int]:
        """Ids newly below `positions` (this stream's, from a segment's manifest): in the
        log once that segment is durable."""
        ...

    def remove(self) -> list[str]:
        """Delete what prepare made on both sides; what was removed, for the report."""
        ...


BenchFactory = Callable[[ConnectorConfig, ConnectorConfig, BenchSpec], BenchLoad]


@dataclass(frozen=True)
class Connector:
    """What one connector package offers (the object its entry point names)."""

    name: str
    store: StoreType[Any] | None = None
    source: SourceType[Any] | None = None
    sink: SinkType[Any] | None = None
    stream: StreamKind | None = None
    bench: BenchFactory | None = None  # (source section, sink section, spec) -> a load
    # the connector whose stream kind this one's streams are (a GCS bucket prefix is an
    # object stream like S3's: replayed, drilled and verified by the s3 connector)
    streams_like: str | None = None


class Connectors:
    """The registry of connectors, by name. Installed connectors are imported when first
    needed: a config's types load only their own connectors (a Kafka-only ship imports
    neither the S3 nor the MLflow connector: about 0.2 s and their dependencies' memory).
    Listing every type (an unknown-type error, replay's options) loads all of them."""

    def __init__(self, connectors: Iterable[Connector] = (), *,
                 lazy: Mapping[str, Callable[[], object]] | None = None) -> None:
        self._loaded: dict[str, Connector] = {c.name: c for c in connectors}
        self._loaders = {n: f for n, f in (lazy or {}).items() if n not in self._loaded}

    @property
    def names(self) -> list[str]:
        """Every connector's name, loaded or not."""
        return sorted({*self._loaded, *self._loaders})

    def connector(self, name: str) -> Connector | None:
        """The connector named `name`, loaded now if it was not (None: no such one)."""
        if name not in self._loaded and name in self._loaders:
            found = self._loaders.pop(name)()
            if not isinstance(found, Connector):
                raise DrstreamError(f"connector {name!r} ({ENTRY_POINT_GROUP} entry point) "
                                    "is not a Connector")
            self._loaded[name] = found
        return self._loaded.get(name)

    def all(self) -> list[Connector]:
        return [c for n in self.names if (c := self.connector(n)) is not None]

    def _find(self, attr: str, type_name: str) -> Any:
        """The `attr` ("store", "source", "sink") type named `type_name`: from the
        connector of that name if it has it (every built-in type is named after its
        connector), else from any connector (which loads them all)."""
        named = self.connector(type_name)
        for c in [named] if named is not None else []:
            kind = getattr(c, attr)
            if kind is not None and kind.name == type_name:
                return kind
        for c in self.all():
            kind = getattr(c, attr)
            if kind is not None and kind.name == type_name:
                return kind
        return None

    def store_named(self, name: str) -> StoreType[Any] | None:
        found: StoreType[Any] | None = self._find("store", name)
        return found

    def source_named(self, name: str) -> SourceType[Any] | None:
        found: SourceType[Any] | None = self._find("source", name)
        return found

    def sink_named(self, name: str) -> SinkType[Any] | None:
        found: SinkType[Any] | None = self._find("sink", name)
        return found

    @property
    def stores(self) -> dict[str, StoreType[Any]]:
        return {c.store.name: c.store for c in self.all() if c.store}

    @property
    def sources(self) -> dict[str, SourceType[Any]]:
        return {c.source.name: c.source for c in self.all() if c.source}

    @property
    def sinks(self) -> dict[str, SinkType[Any]]:
        return {c.sink.name: c.sink for c in self.all() if c.sink}

    @property
    def streams(self) -> dict[str, StreamKind]:
        return {c.name: c.stream for c in self.all() if c.stream}

    def bench(self, source_type: str) -> BenchFactory | None:
        """What `drstream bench` runs through a source of `source_type` (None: its
        connector offers no bench)."""
        named = self.connector(source_type)
        if named is not None and named.source is not None and named.source.name == source_type:
            return named.bench
        return next((c.bench for c in self.all() if c.bench and c.source
                     and c.source.name == source_type), None)

    def _type_of(self, attr: str, config: ConnectorConfig) -> Any:
        """The `attr` ("store", "source", "sink") type `config` names; an unknown one is
        an error that lists the valid ones."""
        found = self._find(attr, config.type)
        if found is None:
            valid = ", ".join(sorted(getattr(self, attr + "s")))
            raise DrstreamError(f"unknown {attr} type {config.type!r}; valid types: {valid}")
        return found

    def store_type(self, config: ConnectorConfig) -> StoreType[Any]:
        found: StoreType[Any] = self._type_of("store", config)
        return found

    def open_store(self, config: ConnectorConfig) -> Store:
        return self.store_type(config).open(config)

    def store_config_from_url(self, url: str) -> ConnectorConfig:
        scheme = url.split("://", 1)[0] if "://" in url else ""
        named = self.store_named(scheme) if scheme in self.names else None
        first = [named] if named is not None and scheme in named.schemes else []
        for st in first or list(self.stores.values()):
            if scheme in st.schemes:
                config: ConnectorConfig = st.from_url(url)
                return config
        valid = ", ".join(sorted(f"{s}://" for t in self.stores.values() for s in t.schemes))
        raise ConfigFieldError("store", url, f"unknown store URL scheme; valid: {valid}")

    def source_type(self, config: ConnectorConfig) -> SourceType[Any]:
        found: SourceType[Any] = self._type_of("source", config)
        return found

    def source(self, config: ConnectorConfig, ctx: Context) -> Source:
        return self.source_type(config).factory(config, ctx)

    def sink_type(self, config: ConnectorConfig) -> SinkType[Any]:
        found: SinkType[Any] = self._type_of("sink", config)
        return found

    def sink(self, config: ConnectorConfig, ctx: Context) -> Sink:
        return self.sink_type(config).factory(config, ctx)

    def kind_of(self, stream: str) -> StreamKind | None:
        c = self.connector(stream.split(":", 1)[0])
        if c is not None and c.stream is None and c.streams_like is not None:
            c = self.connector(c.streams_like)
        return c.stream if c is not None else None

    def stream(self, stream: str, option: str = "--stream") -> StreamKind:
        """The kind of a stream named `<connector>:<name>`."""
        kind = self.kind_of(stream)
        if kind is None:
            valid = ", ".join(f"{c.name}:<name>" for c in self.all()
                              if c.stream is not None or c.streams_like is not None)
            raise ConfigFieldError(option, stream, f"unknown kind of stream; valid: {valid}")
        return kind

    def stream_options(self) -> list[tuple[StreamKind, ReplayOption]]:
        """Every replay option of every stream kind, each flag once."""
        seen: set[str] = set()
        out = []
        for kind in self.streams.values():
            for opt in kind.options:
                if opt.flag not in seen:
                    seen.add(opt.flag)
                    out.append((kind, opt))
        return out


def load(group: str = ENTRY_POINT_GROUP) -> Connectors:
    """The connectors installed under the entry-point `group` (each entry point's name is
    its connector's), each imported when first needed."""
    return Connectors(lazy={ep.name: ep.load for ep in entry_points(group=group)})


@functools.cache
def installed() -> Connectors:
    """The installed connectors, loaded once per process."""
    return load()

