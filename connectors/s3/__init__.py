"""The `s3` store type: any S3 API endpoint through aiobotocore (see store.py)."""

from drstream.connectors.s3.store import (
    ObjectLockConfig,
    S3Store,
    S3StoreConfig,
    retain_days,
    s3_config_from_url,
)
from drstream.daemon.plugins import Connector, StoreType

CONNECTOR = Connector(
    name="s3",
    store=StoreType("s3", S3StoreConfig, S3Store, s3_config_from_url, ("s3",), retain_days),
)

__all__ = ["CONNECTOR", "ObjectLockConfig", "S3Store", "S3StoreConfig", "s3_config_from_url"]
