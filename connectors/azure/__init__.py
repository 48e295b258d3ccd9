"""The `azure` connector: Azure Blob Storage through azure-storage-blob, as a log store
(store.py) and a container prefix as a replicated source (objsource.py), whose object
streams (`azure:<name>`) the s3 connector's sink, replay and drill write to an S3 bucket."""

from drstream.connectors.azure import objsource, store
from drstream.daemon.plugins import Connector, SourceType, StoreType

CONNECTOR = Connector(
    name="azure",
    store=StoreType("azure", store.AzureStoreConfig, store.AzureStore,
                    store.azure_config_from_url, ("az",), store.retain_days),
    source=SourceType("azure", objsource.AzureObjectSourceConfig, objsource.AzureObjectSource,
                      restart_fields=("account", "container", "prefix", "endpoint_url")),
    streams_like="s3",
)

__all__ = ["CONNECTOR"]
