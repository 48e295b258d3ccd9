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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict

from drstream.daemon.codec import Body
from drstream.daemon.errors import ConfigFieldError, DrstreamError
from drstream.daemon.sink import Sink
from drstream.daemon.source import Source
from drstream.daemon.store import Store

if TYPE_CHECKING:
    from drstream.daemon.blobs import BlobStore
    from drstream.daemon.plan import ReplayPlan

ENTRY_POINT_GROUP = "drstream.connectors"


class ConnectorConfig(BaseModel):
    """What the core reads of any connector's config section; the connector's own model
    (registered with its type) adds and checks everything else."""

    model_config = ConfigDict(extra="forbid")

    type: str
    region: str | None = None  # where it runs, for the allowed_regions guard


C = TypeVar("C", bound=ConnectorConfig)


@dataclass(frozen=True)
class Context:
    """What the core hands every source and sink it builds."""

    log_id: str
    blobs: BlobStore | None = None  # the log's blobs (artifact chunks, state snapshots)
    buffer_max_bytes: int = 0  # sources: consumed but unencoded bytes before pausing


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


@dataclass(frozen=True)
class SinkType(Generic[C]):
    name: str
    config_model: type[C]
    factory: Callable[[C, Context], Sink]


@dataclass(frozen=True)
class ReplayOption:
    """A command-line option of `replay` and `drill` that a stream kind understands."""

    flag: str  # "--topics"
    help: str
    metavar: str | None = None
    why: str = ""  # what it does, said when it is given for another kind's stream
    default: str | None = None  # the value that counts as "not given"


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
class Connector:
    """What one connector package offers (the object its entry point names)."""

    name: str
    store: StoreType[Any] | None = None
    source: SourceType[Any] | None = None
    sink: SinkType[Any] | None = None
    stream: StreamKind | None = None


@dataclass(frozen=True)
class Connectors:
    """The registry of loaded connectors, by type name."""

    connectors: tuple[Connector, ...]
    stores: dict[str, StoreType[Any]] = field(init=False)
    sources: dict[str, SourceType[Any]] = field(init=False)
    sinks: dict[str, SinkType[Any]] = field(init=False)
    streams: dict[str, StreamKind] = field(init=False)

    def __post_init__(self) -> None:
        c = self.connectors
        object.__setattr__(self, "stores", {x.store.name: x.store for x in c if x.store})
        object.__setattr__(self, "sources", {x.source.name: x.source for x in c if x.source})
        object.__setattr__(self, "sinks", {x.sink.name: x.sink for x in c if x.sink})
        object.__setattr__(self, "streams", {x.name: x.stream for x in c if x.stream})

    def store_type(self, config: ConnectorConfig) -> StoreType[Any]:
        if config.type not in self.stores:
            valid = ", ".join(sorted(self.stores))
            raise DrstreamError(f"unknown store type {config.type!r}; valid types: {valid}")
        return self.stores[config.type]

    def open_store(self, config: ConnectorConfig) -> Store:
        return self.store_type(config).open(config)

    def store_config_from_url(self, url: str) -> ConnectorConfig:
        scheme = url.split("://", 1)[0] if "://" in url else ""
        for st in self.stores.values():
            if scheme in st.schemes:
                config: ConnectorConfig = st.from_url(url)
                return config
        valid = ", ".join(sorted(f"{s}://" for t in self.stores.values() for s in t.schemes))
        raise ConfigFieldError("store", url, f"unknown store URL scheme; valid: {valid}")

    def source(self, config: ConnectorConfig, ctx: Context) -> Source:
        return self.sources[config.type].factory(config, ctx)

    def sink(self, config: ConnectorConfig, ctx: Context) -> Sink:
        return self.sinks[config.type].factory(config, ctx)

    def kind_of(self, stream: str) -> StreamKind | None:
        return self.streams.get(stream.split(":", 1)[0])

    def stream(self, stream: str, option: str = "--stream") -> StreamKind:
        """The kind of a stream named `<connector>:<name>`."""
        kind = self.streams.get(stream.split(":", 1)[0])
        if kind is None:
            valid = ", ".join(f"{k}:<name>" for k in sorted(self.streams))
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
    """The connectors installed under the entry-point `group`."""
    found = []
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        connector = ep.load()
        if not isinstance(connector, Connector):
            raise DrstreamError(f"entry point {ep.name} = {ep.value} of group {group} is "
                                "not a Connector")
        found.append(connector)
    return Connectors(tuple(found))


@functools.cache
def installed() -> Connectors:
    """The installed connectors, loaded once per process."""
    return load()

