"""The `kafka` connector: the source that `ship` tails and the sink that `apply` writes."""

from connectors.kafka.config import KafkaSinkConfig, KafkaSourceConfig
from connectors.kafka.sink import KafkaSink
from connectors.kafka.source import KafkaSource
from daemon.sink import SinkType, register_sink
from daemon.source import SourceType, register_source

register_source(SourceType(name="kafka", config_model=KafkaSourceConfig, factory=KafkaSource))
register_sink(SinkType(name="kafka", config_model=KafkaSinkConfig, factory=KafkaSink))

__all__ = ["KafkaSink", "KafkaSinkConfig", "KafkaSource", "KafkaSourceConfig"]
