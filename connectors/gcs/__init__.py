"""The `gcs` store type: Google Cloud Storage through its JSON API (see store.py)."""

from drstream.connectors.gcs.store import (
    GcsStore,
    GcsStoreConfig,
    ObjectRetentionConfig,
    gcs_config_from_url,
    retain_days,
)
from drstream.daemon.plugins import Connector, StoreType

CONNECTOR = Connector(
    name="gcs",
    store=StoreType("gcs", GcsStoreConfig, GcsStore, gcs_config_from_url, ("gs",), retain_days),
)

__all__ = ["CONNECTOR", "GcsStore", "GcsStoreConfig", "ObjectRetentionConfig",
           "gcs_config_from_url"]
