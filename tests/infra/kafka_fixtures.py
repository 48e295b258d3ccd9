"""Kafka fixtures: a primary and a standby cluster, real brokers, shared by the session.

Both clusters start together the first time a test asks for either one and are stopped at
session end (work directories are kept when a test failed, for their server.log). A cluster
that cannot start makes the test error, never skip. A test that kills or stops a cluster
must bring it back (`cluster.start()`), since later tests share it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Generator, Iterator

import pytest

from tests.infra.kafka import KafkaCluster, start_clusters

KAFKA_FIXTURES = {"kafka_clusters", "primary_kafka", "standby_kafka"}

# Clusters started by this session, for the failure report hook below.
_running: list[KafkaCluster] = []


@pytest.fixture(scope="session")
def kafka_clusters(request: pytest.FixtureRequest) -> Iterator[tuple[KafkaCluster, KafkaCluster]]:
    primary, standby = start_clusters(("primary", "standby"))
    _running.extend((primary, standby))
    try:
        yield primary, standby
    finally:
        keep_logs = request.session.testsfailed > 0
        for cluster in (primary, standby):
            _running.remove(cluster)
            if keep_logs:
                cluster.stop()
            else:
                cluster.remove()


@pytest.fixture(scope="session")
def primary_kafka(kafka_clusters: tuple[KafkaCluster, KafkaCluster]) -> KafkaCluster:
    return kafka_clusters[0]


@pytest.fixture(scope="session")
def standby_kafka(kafka_clusters: tuple[KafkaCluster, KafkaCluster]) -> KafkaCluster:
    return kafka_clusters[1]


@pytest.fixture
def kafka_topic_name(request: pytest.FixtureRequest) -> str:
    """A topic name no other test uses (the clusters live for the whole session)."""
    base = re.sub(r"[^a-zA-Z0-9._-]+", "-", request.node.name)[:80].strip("-")
    return f"{base}-{uuid.uuid4().hex[:8]}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure of a test using the clusters, attach the tail of each broker's log."""
    report = yield
    if report.failed and KAFKA_FIXTURES & set(getattr(item, "fixturenames", ())):
        for cluster in _running:
            report.sections.append(
                (f"kafka {cluster.name} {cluster.log_path} (last 40 lines)",
                 cluster.log_tail(40))
            )
    return report
