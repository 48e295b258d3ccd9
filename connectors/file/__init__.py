"""The `file` store type: the embedded default log store (see store.py)."""

from drstream.connectors.file.store import FileStore, FileStoreConfig, file_config_from_url
from drstream.daemon.plugins import Connector, StoreType

CONNECTOR = Connector(
    name="file",
    store=StoreType("file", FileStoreConfig, FileStore, file_config_from_url, ("file",)),
)

__all__ = ["CONNECTOR", "FileStore", "FileStoreConfig", "file_config_from_url"]
