"""The object sink: writes an object stream's events into a standby bucket prefix, the same
keys below its own prefix, with the same content type, user metadata and headers.

An object's bytes come from the log's blobs, streamed: an object up to `part_bytes` is
one PutObject, a larger one a multipart upload of `part_bytes` parts, so memory holds one
part and one prefetched chunk. The whole object's size and sha256 are checked before its
last bytes are sent, each part and put carries its Content-MD5 (S3 checks every byte it
receives), and a multipart upload becomes the object only at CompleteMultipartUpload,
atomically: a crash or a wrong checksum never leaves a partial object under the final
key (the upload is aborted; one a crash left behind is aborted before the key's next
upload starts).

The checkpoint is one JSON object, `<checkpoint_prefix>/<log_id>/<prefix>/<name>.json`,
outside the replicated prefix: the applied seq and digest and, while a segment is half
applied, how many of its events are done, written after each object. A restart redoes at most
the one object in flight; a put or delete done twice leaves the same object.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
from collections.abc import AsyncIterator
from typing import Any

from drstream.connectors.s3.events import ObjectEvent, validate_event
from drstream.connectors.s3.objconfig import ObjectSinkConfig
from drstream.connectors.s3.store import S3Store, is_missing
from drstream.daemon.codec import Body, EventBatch
from drstream.daemon.errors import SinkError, StoreError
from drstream.daemon.lifecycle import Closing
from drstream.daemon.logging import get_logger
from drstream.daemon.plugins import Context
from drstream.daemon.progress import SinkProgress, decode_checkpoint, encode_checkpoint
from drstream.daemon.records import Checkpoint

log = get_logger("drstream.s3.sink")


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


class ObjectSink(Closing):
    def __init__(self, config: ObjectSinkConfig, ctx: Context) -> None:
        self.config = config
        self.name = config.sink_name
        self.stream = config.source
        self.blobs = ctx.blobs  # the objects' bytes
        self.store = S3Store(config, where=f"sinks[{self.name}]")
        self.bucket, self.url = config.bucket, self.store.url
        self._prefix = self.store.key_prefix
        self.checkpoint_bucket = config.checkpoint_bucket or config.bucket
        self.checkpoint_key = config.checkpoint_key(ctx.log_id)
        self._progress = SinkProgress(self.name, self._write_checkpoint)
        self._open = False
        self.objects_written = 0

    def _where(self) -> str:
        return f"{self.name} ({self.url})"

    def checkpoint(self) -> Checkpoint:
        return self._progress.cp

    # -- lifecycle -----------------------------------------------------------------------

    async def _connect(self) -> None:
        if not self._open:
            await self.store.start()
            self._open = True

    async def start(self) -> Checkpoint:
        if self._open:
            return self._progress.cp
        await self._connect()
        self._progress.resume(*await self._read_checkpoint())
        log.info("sink_started", sink=self.name, applied_seq=self._progress.cp.seq,
                 partial=self._progress.partial, target=self.url)
        return self._progress.cp

    async def peek(self) -> Checkpoint:
        await self._connect()
        cp, _ = await self._read_checkpoint()
        return cp

    async def sync_groups(self, force: bool = False) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        if not self._open:
            return
        try:
            await self._progress.flush()
        finally:
            await self.store.close()
            self._open = False

    # -- checkpoint ----------------------------------------------------------------------

    async def _read_checkpoint(self) -> tuple[Checkpoint, dict[str, Any] | None]:
        where = f"{self._where()}: checkpoint s3://{self.checkpoint_bucket}/{self.checkpoint_key}"

        async def get() -> bytes | None:
            try:
                resp = await self.store.client.get_object(Bucket=self.checkpoint_bucket,
                                                          Key=self.checkpoint_key)
            except Exception as e:
                if is_missing(e):
                    return None
                raise
            async with resp["Body"] as body:
                data: bytes = await body.read()
            return data

        raw = await self.store.request("get checkpoint", self.checkpoint_key, get)
        return (Checkpoint(), None) if raw is None else decode_checkpoint(raw, where)

    async def _write_checkpoint(self, cp: Checkpoint, partial: dict[str, Any] | None) -> None:
        data = encode_checkpoint(cp, partial).encode()
        await self.store.request("put checkpoint", self.checkpoint_key, functools.partial(
            self.store.client.put_object, Bucket=self.checkpoint_bucket,
            Key=self.checkpoint_key, Body=data, ContentMD5=_md5(data)))

    # -- apply one segment ---------------------------------------------------------------

    def events_of(self, body: Body) -> list[dict[str, Any]]:
        return [ev for b in body.batches
                if isinstance(b, EventBatch) and b.stream == self.stream for ev in b.events]

    async def apply(self, seq: int, digest: bytes, created_at_ms: int, body: Body) -> None:
        if self._progress.cp.seq == 0 and seq > 1 and self.stream in body.manifest.positions:
            # the log was pruned: the objects shipped before `seq` are not in it any more
            raise SinkError(f"{self._where()}: the log starts at segment {seq} (pruned): "
                            f"the objects {self.stream} shipped before it are gone, so a new "
                            "standby prefix cannot be built from it; copy the prefix from a "
                            "standby that has it, with its checkpoint object")
        raw = self.events_of(body)
        events = []
        for i, ev in enumerate(raw):
            try:
                events.append(validate_event(ev))
            except ValueError as e:
                raise SinkError(f"{self.name}: segment {seq} event #{i}: {e}") from e
        cp = Checkpoint(seq=seq, digest=digest, created_at_ms=created_at_ms,
                        positions={self.stream: body.manifest.positions.get(self.stream, {})})
        await self._progress.apply(events, seq, digest, cp,
                                   functools.partial(self._apply_event, seq), unit="objects")

    async def _apply_event(self, seq: int, ev: ObjectEvent) -> None:
        key = self._prefix + ev["key"]
        try:
            if ev["type"] == "object.deleted":
                await self.store.request("delete", key, functools.partial(
                    self.store.client.delete_object, Bucket=self.bucket, Key=key))
            elif ev["size"] <= self.config.part_bytes:
                await self._put_small(key, ev)
            else:
                await self._put_parts(key, ev)
        except StoreError as e:
            raise SinkError(f"{self._where()}: segment {seq}: {ev['type']} {key!r}: {e}",
                            retriable=e.retriable) from e
        self.objects_written += 1

    def _object_args(self, ev: ObjectEvent) -> dict[str, Any]:
        args: dict[str, Any] = {"Metadata": dict(ev["metadata"]), **ev["headers"]}
        if ev["content_type"]:
            args["ContentType"] = ev["content_type"]
        return args

    async def _put_small(self, key: str, ev: ObjectEvent) -> None:
        data = b"".join([c async for c in self._verified(ev)])
        await self.store.request("put", key, functools.partial(
            self.store.client.put_object, Bucket=self.bucket, Key=key, Body=data,
            ContentMD5=_md5(data), **self._object_args(ev)))

    async def _put_parts(self, key: str, ev: ObjectEvent) -> None:
        c = self.store.client
        await self._abort_uploads(key)
        created = await self.store.request("create multipart upload", key, functools.partial(
            c.create_multipart_upload, Bucket=self.bucket, Key=key, **self._object_args(ev)))
        upload_id = created["UploadId"]
        log.info("object_upload_started", sink=self.name, key=key, size=ev["size"])
        parts: list[dict[str, Any]] = []
        buf = bytearray()

        async def send(data: bytes) -> None:
            n = len(parts) + 1
            resp = await self.store.request(f"upload part {n}", key, functools.partial(
                c.upload_part, Bucket=self.bucket, Key=key, UploadId=upload_id,
                PartNumber=n, Body=data, ContentMD5=_md5(data)))
            parts.append({"ETag": resp["ETag"], "PartNumber": n})

        try:
            async for chunk in self._verified(ev):
                buf += chunk
                while len(buf) >= self.config.part_bytes:
                    await send(bytes(buf[:self.config.part_bytes]))
                    del buf[:self.config.part_bytes]
            if buf or not parts:
                await send(bytes(buf))
            await self.store.request("complete multipart upload", key, functools.partial(
                c.complete_multipart_upload, Bucket=self.bucket, Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": parts}))
        except BaseException:
            await asyncio.shield(self._abort(key, upload_id))
            raise
        log.info("object_uploaded", sink=self.name, key=key, size=ev["size"], parts=len(parts))

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            await self.store.request("abort multipart upload", key, functools.partial(
                self.store.client.abort_multipart_upload, Bucket=self.bucket, Key=key,
                UploadId=upload_id))
        except StoreError as e:
            log.warning("multipart_abort_failed", sink=self.name, key=key, error=str(e))

    async def _abort_uploads(self, key: str) -> None:
        """Abort the uploads of `key` a crash left behind (this sink owns its prefix)."""
        resp = await self.store.request("list multipart uploads", key, functools.partial(
            self.store.client.list_multipart_uploads, Bucket=self.bucket, Prefix=key))
        for u in resp.get("Uploads", []):
            if u.get("Key") == key:
                await self._abort(key, u["UploadId"])
                log.info("stale_upload_aborted", sink=self.name, key=key)

    async def _verified(self, ev: ObjectEvent) -> AsyncIterator[bytes]:
        """The object's bytes from the log's blobs, one chunk prefetched; the whole
        object's size and sha256 are checked before its last chunk is handed out."""
        if self.blobs is None:
            raise SinkError(f"{self.name}: no blob store to read objects from")
        chunks = ev["chunks"]
        h = hashlib.sha256()
        size = 0
        nxt: asyncio.Task[bytes] | None = None
        try:
            for i, bid in enumerate(chunks):
                data = await (nxt if nxt is not None else self.blobs.get(bid))
                nxt = asyncio.ensure_future(self.blobs.get(chunks[i + 1])) \
                    if i + 1 < len(chunks) else None
                h.update(data)
                size += len(data)
                if i == len(chunks) - 1 and (size, h.hexdigest()) != (ev["size"], ev["sha256"]):
                    raise SinkError(f"{self._where()}: object {ev['key']!r}: chunks give {size} "
                                    f"bytes with sha256 {h.hexdigest()}, the event names "
                                    f"{ev['size']} bytes with sha256 {ev['sha256']}")
                yield data
        finally:
            if nxt is not None:
                nxt.cancel()
                nxt.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Task[bytes]) -> None:
    """Mark a prefetch that is no longer wanted as seen (no 'never retrieved' noise)."""
    if not task.cancelled():
        task.exception()
