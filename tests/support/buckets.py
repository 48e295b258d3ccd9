"""Bucket prefixes of the object-stream tests on each store, written and read with each
service's own client (boto3, the GCS JSON API over plain HTTP, azure-storage-blob), never
drstream's code: put an object with user metadata and a content type, put a large object
in parts or blocks, delete, and view a prefix object by object."""

from __future__ import annotations

import hashlib
import http.client
import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol
from urllib.parse import quote, urlencode

MiB = 1 << 20
View = dict[str, dict[str, Any]]  # key -> size, sha256, content type, user metadata


class Bucket(Protocol):
    """One bucket (or container) of a test service."""

    def put(self, key: str, data: bytes, metadata: dict[str, str],
            content_type: str = "text/plain") -> None: ...

    def put_big(self, key: str, size: int, seed: int, metadata: dict[str, str],
                part: int = 8 * MiB) -> str:
        """`size` pseudo-random bytes in parts (never whole in memory); their sha256."""
        ...

    def delete(self, key: str) -> None: ...

    def view(self, prefix: str) -> View:
        """Every object under `prefix/` (one deleted between listing and read left out)."""
        ...


def big_parts(size: int, seed: int, part: int) -> Iterator[bytes]:
    """The parts of a large object: pseudo-random, each different."""
    block = hashlib.sha256(str(seed).encode()).digest() * (MiB // 32)
    sent, n = 0, 1
    while sent < size:
        take = min(part, size - sent)
        data = (block * (take // MiB + 1))[:take]
        yield bytes([n % 251]) + data[1:]
        sent += take
        n += 1


def summary(pieces: Iterable[bytes], content_type: str | None,
            metadata: dict[str, str]) -> dict[str, Any]:
    h, size = hashlib.sha256(), 0
    for piece in pieces:
        h.update(piece)
        size += len(piece)
    return {"size": size, "sha256": h.hexdigest(), "content_type": content_type,
            "metadata": metadata}


def wait_views_equal(want: Callable[[], View], have: Callable[[], View],
                     alive: Callable[[], None], timeout: float) -> View:
    """Wait until `have()` equals `want()`; the view. `alive` raises when a process the
    copy needs has exited."""
    deadline = time.monotonic() + timeout
    while True:
        w, h = want(), have()
        if w == h:
            return w
        alive()
        if time.monotonic() > deadline:
            differ = sorted(k for k in set(w) & set(h) if w[k] != h[k])
            raise AssertionError(f"standby differs after {timeout:.0f}s: only on primary "
                                 f"{sorted(set(w) - set(h))[:10]}, only on standby "
                                 f"{sorted(set(h) - set(w))[:10]}, different {differ[:10]}")
        time.sleep(0.5)


class GcsBucket:
    """A bucket of fake-gcs-server through the JSON API."""

    def __init__(self, port: int, bucket: str) -> None:
        self.port, self.bucket = port, bucket

    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None,
                 ok: tuple[int, ...] = (200,)) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of one request, on its own connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            answer = resp.read()
        finally:
            conn.close()
        if resp.status not in ok:
            raise AssertionError(f"GCS {method} {path}: {resp.status} {answer[:300]!r}")
        return resp.status, dict(resp.getheaders()), answer

    def _o(self, key: str) -> str:
        return f"/storage/v1/b/{self.bucket}/o/{quote(key, safe='')}"

    def put(self, key: str, data: bytes, metadata: dict[str, str],
            content_type: str = "text/plain") -> None:
        meta = {"name": key, "contentType": content_type, "metadata": metadata}
        b = uuid.uuid4().hex
        body = b"".join([
            f"--{b}\r\nContent-Type: application/json\r\n\r\n".encode(),
            json.dumps(meta).encode(),
            f"\r\n--{b}\r\nContent-Type: {content_type}\r\n\r\n".encode(), data,
            f"\r\n--{b}--\r\n".encode()])
        self._request("POST", f"/upload/storage/v1/b/{self.bucket}/o?uploadType=multipart",
                      body, {"Content-Type": f"multipart/related; boundary={b}"})

    def put_big(self, key: str, size: int, seed: int, metadata: dict[str, str],
                part: int = 8 * MiB) -> str:
        """A resumable upload, one request per part (a multiple of 256 KiB)."""
        meta = {"name": key, "contentType": "application/x-big", "metadata": metadata}
        _, headers, _ = self._request(
            "POST", f"/upload/storage/v1/b/{self.bucket}/o?uploadType=resumable",
            json.dumps(meta).encode(), {"Content-Type": "application/json"})
        location = headers.get("Location", "")
        path = location[location.index("/upload/"):]
        h, sent = hashlib.sha256(), 0
        for data in big_parts(size, seed, part):
            h.update(data)
            last = sent + len(data) >= size
            rng = f"bytes {sent}-{sent + len(data) - 1}/{size if last else '*'}"
            self._request("PUT", path, data, {"Content-Range": rng}, ok=(200, 201, 308))
            sent += len(data)
        return h.hexdigest()

    def delete(self, key: str) -> None:
        self._request("DELETE", self._o(key), ok=(200, 204))

    def view(self, prefix: str) -> View:
        base = prefix + "/" if prefix else ""
        out: View = {}
        token = ""
        while True:
            q = urlencode({"prefix": base, "pageToken": token})
            page = json.loads(self._request("GET", f"/storage/v1/b/{self.bucket}/o?{q}")[2])
            for o in page.get("items", []):
                status, _, data = self._request("GET", self._o(o["name"]) + "?alt=media",
                                                ok=(200, 404))
                if status == 200:  # else deleted since the listing
                    out[o["name"][len(base):]] = summary(
                        [data], o.get("contentType"), dict(o.get("metadata") or {}))
            token = page.get("nextPageToken", "")
            if not token:
                return out


class AzureBucket:
    """A container of Azurite through azure-storage-blob."""

    def __init__(self, client: Any, container: str) -> None:
        self.c = client.get_container_client(container)

    def put(self, key: str, data: bytes, metadata: dict[str, str],
            content_type: str = "text/plain") -> None:
        from azure.storage.blob import ContentSettings

        self.c.upload_blob(key, data, overwrite=True, metadata=metadata,
                           content_settings=ContentSettings(content_type=content_type))

    def put_big(self, key: str, size: int, seed: int, metadata: dict[str, str],
                part: int = 8 * MiB) -> str:
        """Staged blocks, then one commit of the block list."""
        from azure.storage.blob import BlobBlock, ContentSettings

        blob = self.c.get_blob_client(key)
        h, blocks = hashlib.sha256(), []
        for n, data in enumerate(big_parts(size, seed, part)):
            h.update(data)
            block_id = f"{n:08d}"
            blob.stage_block(block_id, data)
            blocks.append(BlobBlock(block_id))
        blob.commit_block_list(blocks, metadata=metadata, content_settings=ContentSettings(
            content_type="application/x-big"))
        return h.hexdigest()

    def delete(self, key: str) -> None:
        self.c.delete_blob(key)

    def view(self, prefix: str) -> View:
        from azure.core.exceptions import ResourceNotFoundError

        base = prefix + "/" if prefix else ""
        out: View = {}
        for b in self.c.list_blobs(name_starts_with=base, include=["metadata"]):
            try:
                stream = self.c.download_blob(b.name)
            except ResourceNotFoundError:
                continue
            out[b.name[len(base):]] = summary(
                stream.chunks(), b.content_settings.content_type, dict(b.metadata or {}))
        return out


class S3Bucket:
    """A bucket of the S3 API server through boto3."""

    def __init__(self, client: Any, bucket: str) -> None:
        self.c, self.bucket = client, bucket

    def put(self, key: str, data: bytes, metadata: dict[str, str],
            content_type: str = "text/plain") -> None:
        self.c.put_object(Bucket=self.bucket, Key=key, Body=data, Metadata=metadata,
                          ContentType=content_type)

    def put_big(self, key: str, size: int, seed: int, metadata: dict[str, str],
                part: int = 8 * MiB) -> str:
        """A multipart upload."""
        c, bucket = self.c, self.bucket
        up = c.create_multipart_upload(Bucket=bucket, Key=key, ContentType="application/x-big",
                                       Metadata=metadata)
        h, parts = hashlib.sha256(), []
        for n, data in enumerate(big_parts(size, seed, part), start=1):
            h.update(data)
            resp = c.upload_part(Bucket=bucket, Key=key, UploadId=up["UploadId"],
                                 PartNumber=n, Body=data)
            parts.append({"ETag": resp["ETag"], "PartNumber": n})
        c.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=up["UploadId"],
                                    MultipartUpload={"Parts": parts})
        return h.hexdigest()

    def delete(self, key: str) -> None:
        self.c.delete_object(Bucket=self.bucket, Key=key)

    def view(self, prefix: str) -> View:
        c = self.c
        out: View = {}
        base = prefix + "/" if prefix else ""
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                Prefix=base):
            for o in page.get("Contents", []):
                try:
                    resp = c.get_object(Bucket=self.bucket, Key=o["Key"])
                except c.exceptions.NoSuchKey:
                    continue  # deleted since the listing (apply is running)
                out[o["Key"][len(base):]] = summary(
                    resp["Body"].iter_chunks(MiB), resp.get("ContentType"),
                    resp.get("Metadata") or {})
        return out
