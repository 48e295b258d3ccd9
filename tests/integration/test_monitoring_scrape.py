"""The monitoring pack against real processes: every metric that the Grafana dashboard and
the alert rules in monitoring/ query is exported by a running `drstream ship` or
`drstream apply` when scraped.

Real ship and apply (subprocesses of the `drstream` command) run against the test Kafka
clusters and the S3 API server; nothing is mocked. Many series appear only with the event
they count, so the test drives the processes through those events first:

- ship is stopped, the primary deletes records it has not read, ship starts again:
  `drstream_source_lost_offsets_total`;
- the store refuses connections (a TCP proxy in front of the S3 server, ship only) while
  records arrive: upload retries, `drstream_errors_total`;
- the primary cluster is stopped and started again: `drstream_source_up` goes to 0 and
  back to 1 (what DrstreamSourceDown relies on);
- apply applies it all: `drstream_applied_segment_timestamp_seconds` tracks the segments.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from drstream.daemon import __version__
from tests.infra.kafka import KafkaCluster
from tests.infra.procs import free_port
from tests.infra.s3 import S3Server
from tests.infra.tcp_proxy import TcpProxy
from tests.integration.applylib import (
    DrSetup,
    ProcessPool,
    create_topics,
    process_pool,
    unique,
    wait_for,
    write_dr_config,
)
from tests.integration.test_service import metric, produce, scrape
from tests.unit.test_monitoring import PROMETHEUS_SERIES, monitored_names

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    with process_pool(tmp_path) as p:
        yield p


def role_config(setup: DrSetup, role: str, store: dict[str, object]) -> tuple[DrSetup, int]:
    """A copy of the flow's config for one role: its own store address and metrics port."""
    raw = copy.deepcopy(setup.raw)
    port = free_port()
    raw["store"] = store
    raw["service"] = {"ship_metrics_listen": f"127.0.0.1:{port}" if role == "ship" else None,
                      "apply_metrics_listen": f"127.0.0.1:{port}" if role == "apply" else None}
    own = DrSetup(setup.path.with_name(f"{role}.yaml"), raw)
    own.rewrite()
    return own, port


def value(samples: Samples, name: str, **labels: str) -> float:
    found = metric(samples, name, **labels)
    return -1.0 if found is None else found


def test_every_monitored_metric_is_exported(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, s3: S3Server, s3_bucket: str,
    s3_creds_env: None, tmp_path: Path, pool: ProcessPool,
) -> None:
    dash_names, rule_names = monitored_names()
    bootstrap = primary_kafka.bootstrap_servers
    topic = unique("mon")
    create_topics(bootstrap, {topic: 2})
    flow = write_dr_config(
        tmp_path, store={}, source_bootstrap=bootstrap,
        sink_bootstrap=standby_kafka.bootstrap_servers, include=[re.escape(topic)],
        log_id=unique("mon"))
    with TcpProxy(s3.port) as proxy:
        # ship reaches the store through the proxy, apply directly: only ship sees the outage
        ship_cfg, ship_port = role_config(flow, "ship", s3.store_fields(
            s3_bucket, "dr", endpoint_url=proxy.url, max_attempts=2))
        apply_cfg, apply_port = role_config(flow, "apply", s3.store_fields(s3_bucket, "dr"))

        # 1. offsets deleted on the primary while ship is down
        produce(bootstrap, topic, 100, partitions=2, tag="before-")
        first = pool.ship(ship_cfg, "first")
        first.wait_ready()
        wait_for(lambda: value(scrape(ship_port), "drstream_records_total", role="ship",
                               stream=flow.stream) >= 100, 60, "100 records shipped", [first])
        first.stop_ok()
        produce(bootstrap, topic, 100, partitions=2, tag="while-down-")  # offsets 50..99 each
        admin = AdminClient({"bootstrap.servers": bootstrap})
        for fut in admin.delete_records([TopicPartition(topic, 0, 75)]).values():
            fut.result(30)
        ship = pool.ship(ship_cfg, "second")
        ship.wait_ready()
        apply = pool.apply(apply_cfg, "apply")
        apply.wait_ready()
        wait_for(lambda: value(scrape(ship_port), "drstream_source_lost_offsets_total",
                               stream=flow.stream, topic=topic) == 25, 60,
                 "25 offsets counted as lost", [ship])

        # 2. the store refuses connections while records arrive: retried uploads
        proxy.refuse()
        try:
            produce(bootstrap, topic, 50, partitions=2, tag="outage-")
            wait_for(lambda: value(scrape(ship_port), "drstream_errors_total",
                                   kind="StoreUnavailableError") >= 1, 60,
                     "a failed upload counted", [ship])
        finally:
            proxy.pass_through()

        # 3. the primary cluster goes away and comes back
        primary_kafka.stop()
        try:
            wait_for(lambda: value(scrape(ship_port), "drstream_source_up",
                                   stream=flow.stream) == 0, 60, "source_up 0", [ship])
        finally:
            primary_kafka.start()
        wait_for(lambda: value(scrape(ship_port), "drstream_source_up", stream=flow.stream) == 1,
                 60, "source_up back to 1", [ship])

        # everything that reached the primary (less the 25 deleted) is applied
        wait_for(lambda: value(scrape(apply_port), "drstream_records_total", role="apply",
                               stream=flow.log_id) >= 225, 90, "225 records applied",
                 [ship, apply])
        ship_samples, apply_samples = scrape(ship_port), scrape(apply_port)
        ship.stop_ok()  # while the store is still reachable through the proxy
        apply.stop_ok()

    exported = {name for name, _ in ship_samples} | {name for name, _ in apply_samples}
    missing_dash = sorted(dash_names - exported)
    missing_rules = sorted(rule_names - exported - PROMETHEUS_SERIES)
    assert not missing_dash, f"the dashboard queries metrics nobody exports: {missing_dash}"
    assert not missing_rules, f"the alert rules use metrics nobody exports: {missing_rules}"

    # the values the alerts read are the live ones, not leftovers
    assert value(ship_samples, "drstream_info", role="ship", log_id=flow.log_id,
                 version=__version__) == 1
    assert value(apply_samples, "drstream_info", role="apply", log_id=flow.log_id,
                 version=__version__) == 1
    assert value(ship_samples, "drstream_ready") == 1
    assert value(apply_samples, "drstream_ready") == 1
    written = value(apply_samples, "drstream_applied_segment_timestamp_seconds")
    assert 0 < time.time() - written < 60, f"last applied segment written at {written}"
    assert value(ship_samples, "drstream_durable_head_seq") >= \
        value(apply_samples, "drstream_applied_seq") > 0
