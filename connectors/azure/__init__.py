"""The `azure` store type: Azure Blob Storage through azure-storage-blob (see store.py)."""

from drstream.connectors.azure.store import CONNECTOR

__all__ = ["CONNECTOR"]
