"""The `mlflow` connector: the registry source that `ship` reconciles and the standby
registry sink that `apply` writes (model registry replication, DESIGN.md section 5)."""

from connectors.mlflow.config import MlflowSinkConfig, MlflowSourceConfig
from connectors.mlflow.source import MlflowSource
from daemon.source import SourceType, register_source

register_source(SourceType(name="mlflow", config_model=MlflowSourceConfig, factory=MlflowSource))
from connectors.mlflow.sink import MlflowSink  # noqa: E402
from daemon.sink import SinkType, register_sink  # noqa: E402

register_sink(SinkType(name="mlflow", config_model=MlflowSinkConfig, factory=MlflowSink))

__all__ = ["MlflowSinkConfig", "MlflowSource", "MlflowSourceConfig"]
