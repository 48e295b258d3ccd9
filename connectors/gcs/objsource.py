"""A GCS bucket prefix (a dataset, a DVC remote) as a source: the shared object source
(daemon/objsource.py) over this reader, through the JSON API and the log store's client
(store.py: credentials, retries, errors).

In a bucket with object versioning (`versions: auto` reads the bucket's setting), each
scan lists every generation (`versions=true`): new objects and overwrites are new
generations, each shipped; a key whose generations are all noncurrent was deleted, at
the latest `timeDeleted` (GCS has no delete marker: the source ships a delete with that
time). Otherwise listings are compared: each key's generation, size and update time (a
new generation is a create or an overwrite, a key gone from the listing a delete), and
changes between two scans fold into the newest. A listing is 1,000 objects a request
with page tokens (the generations of one name come together, in order); a read takes
the metadata of the generation, then its bytes in 1 MiB pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Literal

import aiohttp
from pydantic import Field

from drstream.connectors.gcs.store import PAGE, GcsBucketConfig, GcsStore, GcsStoreConfig, _ms
from drstream.daemon import objsource
from drstream.daemon.errors import SourceError
from drstream.daemon.objlisting import Entry, newest_first
from drstream.daemon.objsource import ObjectRead, ObjectSourceFields, StoreReader, past
from drstream.daemon.plugins import Context

READ_PIECE = 1 << 20  # bytes per read of an object's body
# the object resource's fields that are the S3 object headers of an event
HEADER_FIELDS = {"cacheControl": "CacheControl", "contentDisposition": "ContentDisposition",
                 "contentEncoding": "ContentEncoding", "contentLanguage": "ContentLanguage"}
LIST_FIELDS = "items(name,generation,size,updated),nextPageToken"
VERSION_FIELDS = "items(name,generation,size,timeCreated,timeDeleted),nextPageToken"


class GcsObjectSourceConfig(ObjectSourceFields, GcsBucketConfig):
    """The primary bucket prefix `ship` watches (stream `gcs:<name>`)."""

    KIND = "gcs"
    versions: Literal["auto", "on", "off"] = Field(
        "auto", description="list every generation (auto: when the bucket has object "
                            "versioning enabled)")


class GcsReader(StoreReader[GcsStore]):
    """Lists and reads a bucket prefix through the GCS JSON API (objsource.BucketReader)."""

    def __init__(self, config: GcsObjectSourceConfig) -> None:
        self.store = GcsStore(GcsStoreConfig.model_validate(
            config.model_dump(include=set(GcsBucketConfig.model_fields))))
        self.url = self.store.url
        self.read_timeout_s = config.request_timeout_s
        self.versions = config.versions

    async def versioned(self) -> bool:
        if self.versions != "auto":
            return self.versions == "on"
        return await self.store.versioning()

    async def listing(self, versioned: bool, after: str | None
                      ) -> AsyncIterator[tuple[str, list[Entry]]]:
        params = {"maxResults": str(PAGE), "fields": VERSION_FIELDS if versioned else LIST_FIELDS}
        if versioned:
            params["versions"] = "true"
        if after is not None:  # inclusive: the key itself is skipped below
            params["startOffset"] = self.store._full(after)
        group: list[dict[str, Any]] = []  # the generations of one name
        async for items in self.store.pages("list", "", params):
            for o in items:
                if group and group[0]["name"] != o["name"]:
                    yield self._key(group, versioned)
                    group = []
                if past(self.store._key(o["name"]), after):
                    group.append(o)
        if group:
            yield self._key(group, versioned)

    def _key(self, group: list[dict[str, Any]], versioned: bool) -> tuple[str, list[Entry]]:
        """One name's listing: its entry, or its generations newest first, led by a delete
        when none is live."""
        key = self.store._key(group[0]["name"])
        if not versioned:
            return key, [_entry(key, group[-1])]
        entries = [Entry(key, str(o["generation"]), str(o["generation"]), int(o.get("size", 0)),
                         _ms(o.get("timeCreated")) or 0) for o in group]
        live = [str(o["generation"]) for o in group if "timeDeleted" not in o]
        if not live:
            deleted = max(_ms(o.get("timeDeleted")) or 0 for o in group)
            entries.append(Entry(key, "", "", 0, deleted, True))
        return key, newest_first(entries, live[-1] if live else None)

    @contextlib.asynccontextmanager
    async def read(self, key: str, version_id: str) -> AsyncIterator[ObjectRead | None]:
        meta = await self.store.meta(key, version_id or None)
        if meta is None:
            yield None
            return
        async with self.store.media(key, str(meta["generation"])) as resp:
            if resp is None:  # overwritten or deleted since: the next scan sees what is
                yield None
                return
            seen = _entry(key, meta, created=bool(version_id))
            try:
                yield ObjectRead(
                    etag=seen.etag, length=seen.size, last_modified_ms=seen.last_modified_ms,
                    content_type=meta.get("contentType"),
                    metadata={str(k): str(v) for k, v in (meta.get("metadata") or {}).items()},
                    headers={h: str(meta[f]) for f, h in HEADER_FIELDS.items() if meta.get(f)},
                    pieces=self._pieces(resp))
            except (OSError, TimeoutError, aiohttp.ClientError) as e:
                raise SourceError(f"{self.url}: reading {key!r} broke off: {e}",
                                  retriable=True) from e

    async def _pieces(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        while True:
            # one stalled read is bounded like one request of the store
            async with asyncio.timeout(self.read_timeout_s):
                piece = await resp.content.read(READ_PIECE)
            if not piece:
                return
            yield piece


def _entry(key: str, o: dict[str, Any], created: bool = False) -> Entry:
    """A listed object resource: its generation is the change token; its time the last
    update (a metadata change too), or its generation's creation (`created`: a version)."""
    return Entry(key, "", str(o.get("generation", "")), int(o.get("size", 0)),
                 _ms(o.get("timeCreated" if created else "updated")) or 0)


class GcsObjectSource(objsource.ObjectSource):
    """The `gcs` source type: the shared object source over a GcsReader."""

    def __init__(self, config: GcsObjectSourceConfig, ctx: Context) -> None:
        super().__init__(config, ctx, GcsReader(config))
