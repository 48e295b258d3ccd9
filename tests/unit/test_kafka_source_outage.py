"""A primary cluster that stops answering while the Kafka source refreshes topic configs or
consumer-group offsets costs a warning, never the shipper.

The admin client's futures end with a bare TimeoutError (not a KafkaException) when no
broker answers within their 10 s; uncaught, it ended the consumer thread and ship exited 3
("Kafka source 'primary' failed: "), seen when a broker stopped in the middle of topic
discovery. Here the cluster is an address where nothing listens: no broker is needed to
show it.
"""

from __future__ import annotations

from confluent_kafka.admin import AdminClient

from drstream.connectors.kafka.config import KafkaSourceConfig
from drstream.connectors.kafka.source import KafkaSource
from drstream.daemon.plugins import Context
from tests.infra.procs import free_port


def dead_source(**fields: object) -> KafkaSource:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    config = KafkaSourceConfig.model_validate({
        "type": "kafka", "bootstrap_servers": dead, "topics": {"include": [".*"]},
        **fields})
    source = KafkaSource(config, Context(log_id="outage", buffer_max_bytes=1 << 20))
    source._admin = AdminClient({"bootstrap.servers": dead, "log_level": 0})
    return source


def test_topic_configs_keep_the_last_known_when_no_broker_answers() -> None:
    source = dead_source()
    source._shipped_meta = {"orders": {"partitions": 3, "configs": {"retention.ms": "600"}}}
    assert source._topic_configs("orders") == {"retention.ms": "600"}


def test_group_offsets_stay_as_they_were_when_no_broker_answers() -> None:
    source = dead_source(groups={"include": [".*"]})
    source._refresh_groups()
    assert source._pending_groups is None and source._group_offsets == {}
