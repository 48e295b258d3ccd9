"""The `file` store type: the embedded default log store (see store.py)."""

from drstream.connectors.file.store import CONNECTOR

__all__ = ["CONNECTOR"]
