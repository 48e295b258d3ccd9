"""The `azure` store type: Azure Blob Storage through azure-storage-blob (see store.py)."""

from drstream.connectors.azure.store import (
    AzureStore,
    AzureStoreConfig,
    ImmutabilityConfig,
    azure_config_from_url,
    retain_days,
)
from drstream.daemon.plugins import Connector, StoreType

CONNECTOR = Connector(
    name="azure",
    store=StoreType("azure", AzureStoreConfig, AzureStore, azure_config_from_url, ("az",),
                    retain_days),
)

__all__ = ["CONNECTOR", "AzureStore", "AzureStoreConfig", "ImmutabilityConfig",
           "azure_config_from_url"]
