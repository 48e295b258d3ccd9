"""The `s3` connector: the S3 log store (store.py), and a bucket prefix on any S3 API
endpoint as a replicated source (objsource.py) and standby sink (objsink.py): datasets
and DVC remotes (docs/datasets.md)."""

from drstream.connectors.s3.objconfig import ObjectSinkConfig, ObjectSourceConfig
from drstream.connectors.s3.objreplay import ObjectStreams
from drstream.connectors.s3.objsink import ObjectSink
from drstream.connectors.s3.objsource import ObjectSource
from drstream.connectors.s3.store import (
    ObjectLockConfig,
    S3Store,
    S3StoreConfig,
    retain_days,
    s3_config_from_url,
)
from drstream.daemon.plugins import Connector, SinkType, SourceType, StoreType

CONNECTOR = Connector(
    name="s3",
    store=StoreType("s3", S3StoreConfig, S3Store, s3_config_from_url, ("s3",), retain_days),
    source=SourceType("s3", ObjectSourceConfig, ObjectSource,
                      restart_fields=("bucket", "prefix", "endpoint_url", "versions")),
    sink=SinkType("s3", ObjectSinkConfig, ObjectSink),
    stream=ObjectStreams(),
)

__all__ = ["CONNECTOR", "ObjectLockConfig", "ObjectSink", "ObjectSinkConfig", "ObjectSource",
           "ObjectSourceConfig", "S3Store", "S3StoreConfig", "s3_config_from_url"]
