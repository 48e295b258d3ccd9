"""The `kafka` connector: the source that `ship` tails, the sink that `apply` writes, and
what replay and drill know of Kafka streams."""

from drstream.connectors.kafka.bench import kafka_bench
from drstream.connectors.kafka.config import KafkaSinkConfig, KafkaSourceConfig
from drstream.connectors.kafka.replay import KafkaStreams
from drstream.connectors.kafka.sink import KafkaSink
from drstream.connectors.kafka.source import KafkaSource
from drstream.daemon.plugins import Connector, SinkType, SourceType

CONNECTOR = Connector(
    name="kafka",
    source=SourceType("kafka", KafkaSourceConfig, KafkaSource,
                      restart_fields=("bootstrap_servers",), sharded=True),
    sink=SinkType("kafka", KafkaSinkConfig, KafkaSink, sharded=True),
    stream=KafkaStreams(),
    bench=kafka_bench,
)

__all__ = ["CONNECTOR", "KafkaSink", "KafkaSinkConfig", "KafkaSource", "KafkaSourceConfig"]
