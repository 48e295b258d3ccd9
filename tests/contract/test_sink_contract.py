"""One contract, every sink type the registry holds: Kafka on a real standby cluster,
MLflow on a real standby registry, each built through its connector with the core's
Context.

What apply relies on from any sink: the one lifecycle (idempotent start and close), a
fresh target starts at checkpoint 0, and a segment applied is in the sink's checkpoint,
durably: another instance (a restarted apply, or status peeking) reads the same seq and
digest. (A peek right after another instance committed may still see the checkpoint
before it: Kafka shows a transaction to read_committed readers once its markers are
written; a restarted start() fences that instance first, so the restart is checked first.)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from drstream.daemon.codec import make_manifest
from drstream.daemon.plugins import ConnectorConfig, Context, installed
from drstream.daemon.records import Body, EventBatch, KafkaBatch, KafkaRecord
from drstream.daemon.sink import Sink
from tests.contract.conftest import log_context

pytestmark = pytest.mark.integration


@dataclass
class SinkKit:
    """One sink type's setting: its config and the body of a segment with one change."""

    config: ConnectorConfig
    body: Callable[[], Body]
    ctx: Context

    def sink(self) -> Sink:
        return installed().sink(self.config, self.ctx)


def kafka_kit(request: pytest.FixtureRequest, ctx: Context) -> SinkKit:
    bootstrap = request.getfixturevalue("standby_kafka").bootstrap_servers
    topic = request.getfixturevalue("kafka_topic_name")
    config = installed().sinks["kafka"].config_model.model_validate({
        "type": "kafka", "name": f"contract-{os.urandom(4).hex()}",
        "bootstrap_servers": bootstrap, "source": "kafka:primary"})

    def body() -> Body:
        batch = KafkaBatch("kafka:primary", topic, 0,
                           [KafkaRecord(0, 1_700_000_000_000, 1, b"key", b"value", [])])
        positions = {"kafka:primary": {topic: {"0": 1}}}
        return Body(make_manifest(positions, [batch]), [batch])

    return SinkKit(config, body, ctx)


def mlflow_kit(request: pytest.FixtureRequest, ctx: Context) -> SinkKit:
    server = request.getfixturevalue("mlflow_standby")
    name = request.getfixturevalue("mlflow_model_name")
    config = installed().sinks["mlflow"].config_model.model_validate({
        "type": "mlflow", "name": f"contract-{os.urandom(4).hex()}",
        "tracking_uri": server.tracking_uri, "source": "mlflow:primary"})

    def body() -> Body:
        batch = EventBatch("mlflow:primary", [
            {"type": "model.created", "name": name, "description": "", "tags": {}}])
        return Body(make_manifest({"mlflow:primary": {}}, [batch]), [batch])

    return SinkKit(config, body, ctx)


def s3_kit(request: pytest.FixtureRequest, ctx: Context) -> SinkKit:
    s3 = request.getfixturevalue("s3")
    request.getfixturevalue("s3_creds_env")
    bucket = request.getfixturevalue("s3_bucket")
    config = installed().sinks["s3"].config_model.model_validate({
        **s3.store_fields(bucket, "replica"), "name": f"contract-{os.urandom(4).hex()}",
        "source": "s3:datasets"})

    def body() -> Body:
        batch = EventBatch("s3:datasets", [
            {"type": "object.deleted", "key": "gone", "version_id": None,
             "last_modified_ms": None, "seen_ms": CREATED_MS}])
        return Body(make_manifest({"s3:datasets": {}}, [batch]), [batch])

    return SinkKit(config, body, ctx)


KITS = {"kafka": kafka_kit, "mlflow": mlflow_kit, "s3": s3_kit}


def test_every_sink_type_is_under_contract() -> None:
    assert set(KITS) == set(installed().sinks), "add a kit for the new sink type"


@pytest.fixture(params=sorted(KITS))
async def kit(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SinkKit]:
    async with log_context(tmp_path, f"sink-contract-{os.urandom(4).hex()}") as ctx:
        yield KITS[request.param](request, ctx)


DIGEST = hashlib.sha256(b"segment 1").digest()
CREATED_MS = 1_700_000_000_123


async def test_lifecycle_is_idempotent(kit: SinkKit) -> None:
    sink = kit.sink()
    await sink.close()  # before start: nothing to release
    async with kit.sink() as sink:
        first = await sink.start()
        assert await sink.start() == first
        await sink.close()
    await sink.close()


async def test_a_fresh_target_starts_at_checkpoint_zero(kit: SinkKit) -> None:
    async with kit.sink() as peeker:
        assert (await peeker.peek()).seq == 0
    async with kit.sink() as sink:
        assert (await sink.start()).seq == 0
        assert sink.checkpoint().seq == 0
        assert await sink.sync_groups() == {}


async def test_an_applied_segment_is_in_the_durable_checkpoint(kit: SinkKit) -> None:
    async with kit.sink() as sink:
        await sink.start()
        await sink.apply(1, DIGEST, CREATED_MS, kit.body())
        cp = sink.checkpoint()
        assert (cp.seq, cp.digest, cp.created_at_ms) == (1, DIGEST, CREATED_MS), cp
    async with kit.sink() as restarted:
        started = await restarted.start()
        assert (started.seq, started.digest) == (1, DIGEST), started
    async with kit.sink() as peeker:
        peeked = await peeker.peek()
        assert (peeked.seq, peeked.digest) == (1, DIGEST), peeked
