"""The `mlflow` connector: the registry source that `ship` reconciles, the standby registry
sink that `apply` writes, and what replay, drill and verify know of registry streams
(model registry replication, DESIGN.md section 5)."""

from drstream.connectors.mlflow.config import MlflowSinkConfig, MlflowSourceConfig
from drstream.connectors.mlflow.replay import MlflowStreams
from drstream.connectors.mlflow.sink import MlflowSink
from drstream.connectors.mlflow.source import MlflowSource
from drstream.daemon.plugins import Connector, SinkType, SourceType

CONNECTOR = Connector(
    name="mlflow",
    source=SourceType("mlflow", MlflowSourceConfig, MlflowSource),
    sink=SinkType("mlflow", MlflowSinkConfig, MlflowSink),
    stream=MlflowStreams(),
)

__all__ = ["CONNECTOR", "MlflowSink", "MlflowSinkConfig", "MlflowSource", "MlflowSourceConfig"]
