"""The S3 object source: a bucket prefix on an S3 API endpoint (a dataset, a DVC remote)
shipped through the shared object source (daemon/objsource.py), which this reader lists
and reads for: ListObjectVersions when versions are listed (new objects, overwrites,
delete markers, versions removed for good), ListObjectsV2 otherwise (ETag, size and
last-modified compared), 1,000 keys a request with continuation; GetObject streamed in
1 MiB pieces. Bucket notifications through SQS (notify.py) are its wake hint.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from botocore.exceptions import BotoCoreError

from drstream.connectors.s3.events import HEADERS
from drstream.connectors.s3.notify import QueueHint
from drstream.connectors.s3.objconfig import ObjectSourceConfig
from drstream.connectors.s3.store import S3Store, is_missing
from drstream.daemon import objsource
from drstream.daemon.errors import SourceError, StoreError
from drstream.daemon.objlisting import Entry, key_order, newest_first
from drstream.daemon.objsource import ObjectRead, StoreReader, epoch_ms, plain_etag
from drstream.daemon.plugins import Context

LIST_PAGE = 1000  # keys per listing request (the S3 maximum)
READ_PIECE = 1 << 20  # bytes per read of an object's body


class S3Reader(StoreReader[S3Store]):
    """Lists and reads a bucket prefix through the S3 API (objsource.BucketReader)."""

    def __init__(self, config: ObjectSourceConfig, where: str) -> None:
        self.config = config
        self.store = S3Store(config, where=where)
        self.url = f"s3://{config.bucket}/{config.prefix}"
        self._prefix = config.prefix + "/" if config.prefix else ""

    async def versioned(self) -> bool:
        if self.config.versions != "auto":
            return self.config.versions == "on"
        resp = await self.store.request("get bucket versioning", None, functools.partial(
            self.store.client.get_bucket_versioning, Bucket=self.config.bucket))
        return resp.get("Status") in ("Enabled", "Suspended")

    def listing(self, versioned: bool, after: str | None
                ) -> AsyncIterator[tuple[str, list[Entry]]]:
        return self._versions(after) if versioned else self._objects(after)

    def _rel(self, full: str) -> str:
        return full[len(self._prefix):]

    async def _objects(self, after: str | None) -> AsyncIterator[tuple[str, list[Entry]]]:
        args: dict[str, Any] = {"Bucket": self.config.bucket, "Prefix": self._prefix,
                                "MaxKeys": LIST_PAGE}
        if after is not None:
            args["StartAfter"] = self._prefix + after
        while True:
            page = await self.store.request("list", self._prefix, functools.partial(
                self.store.client.list_objects_v2, **args))
            for o in page.get("Contents", []):
                rel = self._rel(o["Key"])
                yield rel, [Entry(rel, "", plain_etag(o.get("ETag")), int(o.get("Size", 0)),
                                  epoch_ms(o.get("LastModified")))]
            if not page.get("IsTruncated"):
                return
            args["ContinuationToken"] = page["NextContinuationToken"]
            args.pop("StartAfter", None)

    async def _versions(self, after: str | None) -> AsyncIterator[tuple[str, list[Entry]]]:
        """Each key with its versions and delete markers, newest first; a key whose
        versions span pages is held until its last page."""
        args: dict[str, Any] = {"Bucket": self.config.bucket, "Prefix": self._prefix,
                                "MaxKeys": LIST_PAGE}
        if after is not None:
            args["KeyMarker"] = self._prefix + after
        held: list[Entry] = []
        latest: dict[str, str] = {}
        while True:
            page = await self.store.request("list versions", self._prefix, functools.partial(
                self.store.client.list_object_versions, **args))
            rows = [(v, False) for v in page.get("Versions", [])] + \
                [(m, True) for m in page.get("DeleteMarkers", [])]
            for v, marker in rows:
                rel = self._rel(v["Key"])
                if after is not None and key_order(rel) <= key_order(after):
                    continue  # some servers list the marker's own key again
                vid = str(v.get("VersionId") or "null")
                if v.get("IsLatest"):
                    latest[rel] = vid
                held.append(Entry(rel, vid, "" if marker else plain_etag(v.get("ETag")),
                                  0 if marker else int(v.get("Size", 0)),
                                  epoch_ms(v.get("LastModified")), marker))
            held.sort(key=lambda e: key_order(e.key))  # stable: keeps newest-first order
            last = held[-1].key if held and page.get("IsTruncated") else None
            group: list[Entry] = []
            keep: list[Entry] = []
            for e in held:
                if e.key == last:
                    keep.append(e)
                    continue
                if group and group[0].key != e.key:
                    yield group[0].key, newest_first(group, latest.pop(group[0].key, None))
                    group = []
                group.append(e)
            if group:
                yield group[0].key, newest_first(group, latest.pop(group[0].key, None))
            held = keep
            if not page.get("IsTruncated"):
                return
            args["KeyMarker"] = page["NextKeyMarker"]
            if page.get("NextVersionIdMarker"):
                args["VersionIdMarker"] = page["NextVersionIdMarker"]
            else:
                args.pop("VersionIdMarker", None)

    @contextlib.asynccontextmanager
    async def read(self, key: str, version_id: str) -> AsyncIterator[ObjectRead | None]:
        full = self._prefix + key
        args: dict[str, Any] = {"Bucket": self.config.bucket, "Key": full}
        if version_id:
            args["VersionId"] = version_id
        try:
            resp = await self.store.request("get", full, functools.partial(
                self.store.client.get_object, **args))
        except StoreError as e:
            if is_missing(e):
                yield None
                return
            raise
        try:
            async with resp["Body"] as body:
                length = resp.get("ContentLength")
                yield ObjectRead(
                    etag=plain_etag(resp.get("ETag")),
                    length=int(length) if length is not None else None,
                    last_modified_ms=epoch_ms(resp.get("LastModified")),
                    content_type=resp.get("ContentType"),
                    metadata=dict(resp.get("Metadata") or {}),
                    headers={k: resp[k] for k in HEADERS if resp.get(k)},
                    pieces=body.iter_chunks(READ_PIECE))
        except (OSError, TimeoutError, aiohttp.ClientError, BotoCoreError) as e:
            raise SourceError(f"{self.url}: reading {full!r} broke off: {e}",
                              retriable=True) from e


class ObjectSource(objsource.ObjectSource):
    """The `s3` source type: the shared object source over an S3Reader, woken by the
    bucket's notifications in an SQS queue when `notifications` is set."""

    def __init__(self, config: ObjectSourceConfig, ctx: Context) -> None:
        where = f"sources[{config.stream}]"
        hint = None
        if config.notifications is not None:
            hint = QueueHint(config.notifications, config, config.stream,
                             f"{where}.notifications")
        super().__init__(config, ctx, S3Reader(config, where=where), hint)

