"""The `file` store type: the embedded default log store (see store.py)."""

from connectors.file.store import FileStore, FileStoreConfig, check_key, file_config_from_url
from daemon.store import StoreType, register_store

register_store(
    StoreType(
        name="file",
        config_model=FileStoreConfig,
        factory=FileStore,
        from_url=file_config_from_url,
        schemes=("file",),
    )
)

__all__ = ["FileStore", "FileStoreConfig", "check_key", "file_config_from_url"]
