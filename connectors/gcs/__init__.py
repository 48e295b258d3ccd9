"""The `gcs` store type: Google Cloud Storage through its JSON API (see store.py)."""

from drstream.connectors.gcs.store import CONNECTOR

__all__ = ["CONNECTOR"]
