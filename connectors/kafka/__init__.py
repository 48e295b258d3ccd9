"""The `kafka` connector: source (ship) now; sink and admin join with apply."""

from connectors.kafka.config import KafkaSourceConfig
from connectors.kafka.source import KafkaSource
from daemon.source import SourceType, register_source


def _source(config: KafkaSourceConfig, **kw: object) -> KafkaSource:
    return KafkaSource(config, **kw)  # type: ignore[arg-type]


register_source(SourceType(name="kafka", config_model=KafkaSourceConfig, factory=_source))

__all__ = ["KafkaSource", "KafkaSourceConfig"]
