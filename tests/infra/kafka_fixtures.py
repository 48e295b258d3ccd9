"""Kafka fixtures: a primary and a standby cluster, real brokers, shared by the session.

Both clusters start together the first time a test asks for either one and are stopped at
session end (work directories are kept when a test failed, for their server.log). A cluster
that cannot start makes the test error, never skip. A test that kills or stops a cluster
must bring it back (`cluster.start()`), since later tests share it.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from tests.infra.kafka import KafkaCluster, start_clusters
from tests.infra.procs import attach_log_tails, unique_test_name

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
    return unique_test_name(request.node.name, 80)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure of a test using the clusters, attach the tail of each broker's log."""
    report = yield
    attach_log_tails(report, item, KAFKA_FIXTURES, list(_running), "kafka")
    return report
