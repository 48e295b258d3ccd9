"""The `gcs` connector: Google Cloud Storage through its JSON API, as a log store
(store.py) and a bucket prefix as a replicated source (objsource.py), whose object streams
(`gcs:<name>`) the s3 connector's sink, replay and drill write to an S3 bucket."""

from drstream.connectors.gcs import objsource, store
from drstream.daemon.plugins import Connector, SourceType, StoreType

CONNECTOR = Connector(
    name="gcs",
    store=StoreType("gcs", store.GcsStoreConfig, store.GcsStore, store.gcs_config_from_url,
                    ("gs",), store.retain_days),
    source=SourceType("gcs", objsource.GcsObjectSourceConfig, objsource.GcsObjectSource,
                      restart_fields=("bucket", "prefix", "endpoint_url")),
    streams_like="s3",
)

__all__ = ["CONNECTOR"]
