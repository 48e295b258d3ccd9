"""ship and apply ride out a minute without their store, and a primary broker restart.

Both reach the S3 server through one TCP proxy. While records keep arriving the store
refuses connections for 30 s, then swallows every request for 30 s (a black hole: each
request hangs until the client times out); meanwhile the primary's broker is restarted.
Neither process may exit: both report not-ready (/readyz 503, drstream_store_up 0) while
it lasts, and once the store is back the standby ends exactly equal to the primary,
record by record. Before the outage budget (service.outage_budget_s) an outage of this
length ended both within about 5 s (exit 3).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.infra.kafka import KafkaCluster
from tests.infra.s3 import S3Server
from tests.infra.tcp_proxy import TcpProxy
from tests.integration.applylib import (
    ProcessPool,
    as_source,
    checkpoint_watch,
    compare_replica,
    count,
    create_topics,
    next_offsets,
    process_pool,
    read_topics,
    seeded_rng,
    unique,
    write_dr_config,
)
from tests.integration.shiplib import LoadProducer
from tests.integration.test_monitoring_scrape import role_config, value
from tests.integration.test_service import answers, produce, scrape
from tests.support.procs import wait_for

# a minute of outage plus the catch-up: make soak, not make test
pytestmark = [pytest.mark.integration, pytest.mark.soak]

REFUSE_S = BLACKHOLE_S = 30.0


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    with process_pool(tmp_path) as p:
        yield p


def test_a_minute_without_the_store_and_a_broker_restart_are_ridden_out(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, s3: S3Server, s3_bucket: str,
    s3_creds_env: None, kafka_topic_name: str, tmp_path: Path, pool: ProcessPool,
) -> None:
    rng = seeded_rng()
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    topics = {f"{kafka_topic_name}.a": 2, f"{kafka_topic_name}.b": 1}
    create_topics(primary, topics)
    flow = write_dr_config(tmp_path, store={}, source_bootstrap=primary,
                           sink_bootstrap=standby, log_id=unique("outage"),
                           include=[re.escape(kafka_topic_name) + r"\..*"])
    with TcpProxy(s3.port) as proxy, checkpoint_watch(standby) as watch:
        store = s3.store_fields(s3_bucket, "dr", endpoint_url=proxy.url)
        ship_cfg, ship_port = role_config(flow, "ship", store)
        apply_cfg, apply_port = role_config(flow, "apply", store)
        load = LoadProducer(primary, topics, rate_per_s=200, seed=rng.randrange(2**31)).start()
        try:
            ship, apply = pool.ship(ship_cfg, "ship"), pool.apply(apply_cfg, "apply")
            ship.wait_ready(60)
            apply.wait_ready(60)
            load.wait_produced(300)
            procs = [ship, apply]

            started = time.monotonic()
            proxy.refuse()
            for port, role in ((ship_port, "ship"), (apply_port, "apply")):
                wait_for(answers(port, "/readyz", 503), REFUSE_S, f"{role} not ready", procs)
                assert value(scrape(port), "drstream_store_up") == 0, role
            time.sleep(max(0.0, started + REFUSE_S - time.monotonic()))
            proxy.blackhole()
            load.stop()  # a broker restart would fail its transactions: stop it first
            primary_kafka.restart()
            produce(primary, f"{kafka_topic_name}.b", 100, tag="after-restart-")
            time.sleep(max(0.0, started + REFUSE_S + BLACKHOLE_S - time.monotonic()))
            for port, role in ((ship_port, "ship"), (apply_port, "apply")):
                assert answers(port, "/readyz", 503)(), f"{role} ready while the store is down"
                assert value(scrape(port), "drstream_store_up") == 0, role
            assert ship.alive(), ship.describe()
            assert apply.alive(), apply.describe()
            print(f"store down {time.monotonic() - started:.0f}s, primary broker restarted; "
                  f"{load.produced + 100} records produced")

            proxy.pass_through()
            back = time.monotonic()
            for port, role in ((ship_port, "ship"), (apply_port, "apply")):
                wait_for(answers(port, "/readyz", 200), 120, f"{role} ready again", procs)
                assert value(scrape(port), "drstream_store_up") == 1, role
            source = read_topics(primary, topics)
            watch.wait_applied(apply_cfg, next_offsets(source), timeout=180, procs=procs)
            print(f"standby caught up {time.monotonic() - back:.1f}s after the store came back")
            for proc, event in ((ship, '"store_outage"'), (apply, '"store_outage"'),
                                (ship, '"store_back"'), (apply, '"store_back"')):
                assert event in proc.output(), proc.describe()
            ship.stop_ok()
            apply.stop_ok()
        finally:
            load.halt()
    replica = read_topics(standby, topics)
    compare_replica(as_source(replica, origin="primary"), source,
                    what="standby vs primary after a minute without the store")
    print(f"{count(replica)} records on the standby, each exactly once, in order")
