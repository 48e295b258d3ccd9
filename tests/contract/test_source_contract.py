"""One contract, every source type the registry holds: Kafka on a real cluster, MLflow on
a real registry, bucket prefixes on the S3 API server, fake-gcs-server and Azurite, each
built through its connector with the core's Context.

What the pipeline relies on from any source: the one lifecycle (idempotent start and
close), a change arrives as a delivery whose positions are the source's own, a source
started at those positions hands out nothing it handed out before (the log is the
checkpoint), and probe() tells what the live source holds beyond given positions.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from drstream.daemon.plugins import ConnectorConfig, Context, installed
from drstream.daemon.records import KafkaBatch
from drstream.daemon.source import Delivery, Source
from tests.contract.conftest import log_context
from tests.integration.shiplib import create_topic, flush, producer
from tests.support.buckets import AzureBucket, Bucket, GcsBucket, S3Bucket

pytestmark = pytest.mark.integration
LOG_ID = "source-contract"


@dataclass
class SourceKit:
    """One source type's setting: its config and a way to make one change on the primary."""

    config: ConnectorConfig
    change: Callable[[], Awaitable[None]]
    ctx: Context

    def source(self) -> Source:
        return installed().source(self.config, self.ctx)


async def kafka_kit(request: pytest.FixtureRequest, ctx: Context) -> SourceKit:
    bootstrap = request.getfixturevalue("primary_kafka").bootstrap_servers
    topic = request.getfixturevalue("kafka_topic_name")
    await asyncio.to_thread(create_topic, bootstrap, topic)
    config = installed().sources["kafka"].config_model.model_validate({
        "type": "kafka", "bootstrap_servers": bootstrap, "topics": {"include": [topic]},
        "group_id": f"contract-{os.urandom(4).hex()}"})
    n = [0]

    def produce() -> None:
        p = producer(bootstrap)
        p.produce(topic, f"value {n[0]}".encode(), b"key")
        n[0] += 1
        flush(p)

    return SourceKit(config, lambda: asyncio.to_thread(produce), ctx)


async def mlflow_kit(request: pytest.FixtureRequest, ctx: Context) -> SourceKit:
    server = request.getfixturevalue("mlflow_primary")
    name = request.getfixturevalue("mlflow_model_name")
    config = installed().sources["mlflow"].config_model.model_validate({
        "type": "mlflow", "tracking_uri": server.tracking_uri, "interval_s": 0.3,
        "models": {"include": [f"{name}.*"]}})
    n = [0]

    def create_model() -> None:
        server.client().create_registered_model(f"{name}-{n[0]}")
        n[0] += 1

    return SourceKit(config, lambda: asyncio.to_thread(create_model), ctx)


async def s3_kit(request: pytest.FixtureRequest, ctx: Context) -> SourceKit:
    s3 = request.getfixturevalue("s3")
    request.getfixturevalue("s3_creds_env")
    bucket = request.getfixturevalue("s3_bucket")
    return _bucket_kit(s3.store_fields(bucket, "data"), S3Bucket(s3.client, bucket), ctx)


async def gcs_kit(request: pytest.FixtureRequest, ctx: Context) -> SourceKit:
    gcs = request.getfixturevalue("gcs")
    bucket = request.getfixturevalue("gcs_bucket")
    return _bucket_kit(gcs.store_fields(bucket, "data"), GcsBucket(gcs.port, bucket), ctx)


async def azure_kit(request: pytest.FixtureRequest, ctx: Context) -> SourceKit:
    azurite = request.getfixturevalue("azurite")
    request.getfixturevalue("azure_creds_env")
    container = request.getfixturevalue("azure_container")
    return _bucket_kit(azurite.store_fields(container, "data"),
                       AzureBucket(azurite._client(), container), ctx)


def _bucket_kit(fields: dict[str, Any], bucket: Bucket, ctx: Context) -> SourceKit:
    """A bucket-prefix source on the store `fields` name; a change is one more object."""
    config = installed().sources[fields["type"]].config_model.model_validate(
        {**fields, "interval_s": 0.3})
    return SourceKit(config, _puts(bucket), ctx)


def _puts(bucket: Bucket) -> Callable[[], Awaitable[None]]:
    """A change: one more object under data/."""
    n = [0]

    def put_object() -> None:
        bucket.put(f"data/object-{n[0]}", b"x" * n[0], {})
        n[0] += 1

    return lambda: asyncio.to_thread(put_object)


KITS = {"kafka": kafka_kit, "mlflow": mlflow_kit, "s3": s3_kit, "gcs": gcs_kit,
        "azure": azure_kit}


def test_every_source_type_is_under_contract() -> None:
    assert set(KITS) == set(installed().sources), "add a kit for the new source type"


@pytest.fixture(params=sorted(KITS))
async def kit(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SourceKit]:
    async with log_context(tmp_path, LOG_ID) as ctx:
        yield await KITS[request.param](request, ctx)


def changes(d: Delivery) -> int:
    """Records (a KafkaBatch, or the Kafka source's KafkaColumns) and events."""
    return sum(len(b.records) if isinstance(b, KafkaBatch) else len(b) for b in d.batches) + \
        sum(len(e.events) for e in d.events)


async def read_changes(src: Source, want: int, timeout: float = 60) -> list[Delivery]:
    """Deliveries until `want` changes arrived (fails on timeout)."""
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while sum(map(changes, got)) < want:
        assert time.monotonic() < deadline, f"{sum(map(changes, got))} of {want} changes"
        d = await src.read(0.2)
        if d is not None:
            got.append(d)
    return got


async def quiet_for(src: Source, seconds: float) -> int:
    """Changes delivered within `seconds` (none expected)."""
    n, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        d = await src.read(0.2)
        n += changes(d) if d is not None else 0
    return n


async def test_lifecycle_is_idempotent(kit: SourceKit) -> None:
    src = kit.source()
    await src.close()  # before start: nothing to release
    async with kit.source() as src:
        await src.start(None)
        await src.start(None)
        await kit.change()
        assert sum(map(changes, await read_changes(src, 1))) == 1
        await src.close()
    await src.close()


async def test_a_change_arrives_with_the_sources_positions(kit: SourceKit) -> None:
    async with kit.source() as src:
        await src.start(None)
        await kit.change()
        deliveries = await read_changes(src, 1)
        streams = {b.stream for d in deliveries for b in [*d.batches, *d.events]}
        assert streams == {src.stream}, streams
        assert src.stream.startswith(f"{kit.config.type}:"), src.stream
        assert deliveries[-1].positions == src.positions()
        assert src.positions(), "positions after a change must name it"


async def test_a_source_started_at_its_positions_hands_out_only_new_changes(
        kit: SourceKit) -> None:
    async with kit.source() as first:
        await first.start(None)
        await kit.change()
        await read_changes(first, 1)
        positions: dict[str, Any] = first.positions()
    async with kit.source() as second:
        await second.start(positions)
        assert await quiet_for(second, 2.0) == 0, "a change was handed out twice"
        await kit.change()
        assert sum(map(changes, await read_changes(second, 1))) == 1


async def test_probe_counts_what_the_positions_lack(kit: SourceKit) -> None:
    async with kit.source() as src:
        await src.start(None)
        await kit.change()
        await read_changes(src, 1)
        positions = src.positions()
    async with kit.source() as prober:
        probe = await prober.probe(positions)
        assert probe.reachable and probe.pending_records == 0, probe
        await kit.change()
        probe = await prober.probe(positions)
        assert probe.reachable and probe.pending_records == 1, probe
