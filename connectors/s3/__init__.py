"""The `s3` store type: any S3 API endpoint through aiobotocore (see store.py)."""

from connectors.s3.store import (
    ObjectLockConfig,
    S3Store,
    S3StoreConfig,
    resolve_secret,
    s3_config_from_url,
)
from daemon.store import StoreType, register_store

register_store(
    StoreType(
        name="s3",
        config_model=S3StoreConfig,
        factory=S3Store,
        from_url=s3_config_from_url,
        schemes=("s3",),
    )
)

__all__ = ["ObjectLockConfig", "S3Store", "S3StoreConfig", "resolve_secret", "s3_config_from_url"]
