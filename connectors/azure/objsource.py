"""An Azure Blob container prefix (a dataset, a DVC remote) as a source: the shared
object source (daemon/objsource.py) over this reader, through azure-storage-blob and the
log store's client (store.py: credentials, retries, errors).

Change capture compares listings: each blob's ETag, size and last-modified (a new ETag is
a create or an overwrite, a blob gone from the listing a delete). Blob versions are not
listed: changes between two scans fold into the newest. A listing is 5,000 blobs a
request with continuation markers; a read is the SDK's download in 4 MiB ranges, each
after the first conditional on the first one's ETag (a blob overwritten mid-read fails
the read, and the scan is retried).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from azure.core.exceptions import AzureError

from drstream.connectors.azure.store import AzureContainerConfig, AzureStore, AzureStoreConfig
from drstream.daemon import objsource
from drstream.daemon.errors import SourceError
from drstream.daemon.objlisting import Entry
from drstream.daemon.objsource import (
    ObjectRead,
    ObjectSourceFields,
    StoreReader,
    epoch_ms,
    past,
    plain_etag,
)
from drstream.daemon.plugins import Context

READ_PIECE = 4 << 20  # bytes per ranged read (the SDK's default first read is 32 MiB)
# the content settings that are the S3 object headers of an event
HEADER_FIELDS = {"cache_control": "CacheControl", "content_disposition": "ContentDisposition",
                 "content_encoding": "ContentEncoding", "content_language": "ContentLanguage"}


class AzureObjectSourceConfig(ObjectSourceFields, AzureContainerConfig):
    """The primary container prefix `ship` watches (stream `azure:<name>`)."""

    KIND = "azure"


class _ReadingStore(AzureStore):
    """The store's client with reads bounded to READ_PIECE per request."""

    CLIENT_OPTIONS = {"max_single_get_size": READ_PIECE, "max_chunk_get_size": READ_PIECE}


class AzureReader(StoreReader["_ReadingStore"]):
    """Lists and reads a container prefix (objsource.BucketReader)."""

    def __init__(self, config: AzureObjectSourceConfig) -> None:
        self.store = _ReadingStore(AzureStoreConfig.model_validate(
            config.model_dump(include=set(AzureContainerConfig.model_fields))))
        self.url = self.store.url

    async def listing(self, versioned: bool, after: str | None
                      ) -> AsyncIterator[tuple[str, list[Entry]]]:
        # inclusive (and a server may ignore it): keys up to `after` are skipped below
        start_from = self.store._full(after) if after is not None else None
        marker: str | None = None
        while True:
            items, marker = await self.store.page("list", start_from, marker)
            for b in items:
                key = self.store._key(str(b.name))
                if past(key, after):
                    yield key, [Entry(key, "", plain_etag(b.etag), int(b.size or 0),
                                      epoch_ms(b.last_modified))]
            if marker is None:
                return

    @contextlib.asynccontextmanager
    async def read(self, key: str, version_id: str) -> AsyncIterator[ObjectRead | None]:
        stream = await self.store.download(key)
        try:
            yield None if stream is None else _object(stream)
        except (OSError, TimeoutError, aiohttp.ClientError, AzureError) as e:
            raise SourceError(f"{self.url}: reading {key!r} broke off: {e}",
                              retriable=True) from e


def _object(stream: Any) -> ObjectRead:
    """What the SDK's downloader says of the blob, and its bytes."""
    p = stream.properties
    settings = p.content_settings
    return ObjectRead(
        etag=plain_etag(p.etag), length=int(p.size), last_modified_ms=epoch_ms(p.last_modified),
        content_type=settings.content_type,
        metadata={str(k): str(v) for k, v in (p.metadata or {}).items()},
        headers={h: str(getattr(settings, f)) for f, h in HEADER_FIELDS.items()
                 if getattr(settings, f, None)},
        pieces=stream.chunks())


class AzureObjectSource(objsource.ObjectSource):
    """The `azure` source type: the shared object source over an AzureReader."""

    def __init__(self, config: AzureObjectSourceConfig, ctx: Context) -> None:
        super().__init__(config, ctx, AzureReader(config))
