"""The Google Cloud Storage log store: the JSON API over aiohttp, create-if-absent with
`ifGenerationMatch=0`.

Requests are plain aiohttp (no blocking call, one connection pool); gcloud-aio-auth only
mints OAuth tokens (service-account JSON, or Application Default Credentials: the
GOOGLE_APPLICATION_CREDENTIALS file, gcloud's login, or the metadata server of a GCE/GKE
host). Uploads are single-request multipart uploads: the object's metadata (its MD5, which
GCS checks, and its retention) travels with the bytes, and the precondition holds for
the whole write.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Literal
from urllib.parse import quote, unquote

import aiohttp
from gcloud.aio.auth import Token
from multidict import CIMultiDict
from pydantic import field_validator, model_validator

from drstream.daemon import remotestore
from drstream.daemon.errors import ConfigFieldError, StoreError
from drstream.daemon.remotestore import Refusal, Transient
from drstream.daemon.secrets import read_secret
from drstream.daemon.store import ObjectInfo, ObjectTooLargeError

PUBLIC_ENDPOINT = "https://storage.googleapis.com"
SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
# GCS bucket names: 3-63 of a-z 0-9 - _ . (up to 222 with dots; drstream keeps 63).
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")
PAGE = 1000  # objects per list page (the JSON API's maximum)


class ObjectRetentionConfig(remotestore.RetentionConfig):
    """Per-object retention (a bucket with object retention enabled); `Locked` cannot be
    shortened by anyone."""

    mode: Literal["Unlocked", "Locked"]


class GcsBucketConfig(remotestore.CloudStoreConfig):
    """Where a bucket prefix is and how to reach it: what the log store and the object
    source (objsource.py) both say."""

    type: Literal["gcs"]
    bucket: str
    # Secret references. service_account: the key JSON; token: an OAuth2 access token.
    # Neither (and not anonymous): Application Default Credentials.
    service_account: str | None = None
    token: str | None = None
    anonymous: bool = False  # no Authorization header: emulators only

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, v: str) -> str:
        if not BUCKET_RE.match(v) or ".." in v or v.startswith("goog"):
            raise ValueError(f"bucket name {v!r} is not valid (3-63 of a-z 0-9 . _ -, "
                             "starting and ending with a letter or digit)")
        return v

    _refs = field_validator("service_account", "token")(remotestore.secret_ref)

    @model_validator(mode="after")
    def _one_credential(self) -> GcsBucketConfig:
        given = [n for n in ("service_account", "token") if getattr(self, n) is not None]
        if len(given) + self.anonymous > 1:
            raise ValueError("give at most one of service_account, token and anonymous")
        return self


class GcsStoreConfig(GcsBucketConfig):
    object_retention: ObjectRetentionConfig | None = None


def retain_days(config: GcsStoreConfig) -> int | None:
    """Days a written object stays under retention (prune never tries to delete it)."""
    return config.object_retention.retain_days if config.object_retention else None


def gcs_config_from_url(url: str) -> GcsStoreConfig:
    """`gs://bucket/prefix`; the endpoint comes from STORAGE_EMULATOR_HOST (the variable
    Google's client libraries read), credentials from Application Default Credentials."""
    parts = remotestore.split_url(url, "gs", "gs://bucket/prefix")
    emulator = os.environ.get("STORAGE_EMULATOR_HOST") or None
    if emulator and "://" not in emulator:
        emulator = f"http://{emulator}"
    return remotestore.config_from_url(GcsStoreConfig, url, {
        "type": "gcs", "bucket": parts.netloc, "prefix": unquote(parts.path),
        "endpoint_url": emulator, "anonymous": emulator is not None,
    })


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return body[:300].decode(errors="replace")


def _ms(rfc3339: str | None) -> int | None:
    if not rfc3339:
        return None
    return int(dt.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp() * 1000)


class GcsStore(remotestore.RemoteStore[GcsStoreConfig, aiohttp.ClientSession]):
    """A Store over one bucket and name prefix of Google Cloud Storage; fencing rests on
    `ifGenerationMatch=0`."""

    CREDENTIAL_FIELDS = "service_account/token"
    RETENTION = "a retention policy or hold"

    def __init__(self, config: GcsStoreConfig) -> None:
        super().__init__(config, f"gs://{config.bucket}/{config.prefix}",
                         config.endpoint_url or PUBLIC_ENDPOINT, f"bucket {config.bucket!r}")
        self.bucket = config.bucket
        self._token: Token | None = None
        self._static_token: str | None = None

    @staticmethod
    def _service_error(e: BaseException | None) -> str | None:
        return f"HTTP {e.status}: {e.message}" if isinstance(e, _HttpError) else None

    # -- lifecycle ---------------------------------------------------------------

    async def _connect(self) -> None:
        c = self.config
        self._client = session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
            total=None, connect=c.connect_timeout_s))
        self._opened.push_async_callback(session.close)
        if c.token is not None:
            self._static_token = read_secret(c.token, "store.token")
        elif not c.anonymous:
            sa = self._service_account() if c.service_account else None
            # typed for its requests-based twin (gcloud-rest); this build is aiohttp
            self._token = Token(service_file=sa, session=self._client,  # type: ignore[arg-type]
                                scopes=[SCOPE])
        await self._check_bucket()

    def _service_account(self) -> io.StringIO:
        """The key JSON, checked here: the token library would quietly fall back to the
        metadata server on a file it cannot read."""
        ref = self.config.service_account or ""
        text = read_secret(ref, "store.service_account")
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict) or data.get("type") not in (
                "service_account", "authorized_user", "external_account",
                "impersonated_service_account"):
            raise ConfigFieldError("store.service_account", ref,
                                   "not a Google credentials JSON (a service-account key file)")
        return io.StringIO(text)

    async def _check_bucket(self) -> None:
        """Fail at open, clearly, on a missing bucket or refused credentials."""
        status, _, _ = await self._request(
            "open", None, "GET", f"/storage/v1/b/{self.bucket}", accept=(200, 404))
        if status == 404:
            raise self._refused("open", None, Refusal.MISSING, "")

    # -- requests ------------------------------------------------------------------

    async def _auth(self) -> dict[str, str]:
        if self._static_token is not None:
            return {"Authorization": f"Bearer {self._static_token}"}
        if self._token is None:
            return {}
        try:
            return {"Authorization": f"Bearer {await self._token.get()}"}
        except aiohttp.ClientResponseError as e:
            if e.status in remotestore.RETRIABLE_STATUS:
                raise Transient(e) from e
            raise StoreError(f"store {self.url}: Google credentials rejected when minting a "
                             f"token (HTTP {e.status}); check service_account or the "
                             "Application Default Credentials") from e
        except (aiohttp.ClientError, OSError) as e:
            raise Transient(e) from e
        except Exception as e:  # gcloud-aio-auth raises bare errors for unusable credentials
            raise StoreError(f"store {self.url}: no usable Google credentials "
                             f"({type(e).__name__}); set service_account or token, or "
                             "configure Application Default Credentials") from e

    async def _request(
        self, op: str, key: str | None, method: str, path: str, **kw: Any,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One request under the store's retries (see _send_once)."""
        return await self._retrying(op, key, lambda: self._send_once(op, key, method, path,
                                                                      **kw))

    async def _send_once(
        self, op: str, key: str | None, method: str, path: str, *,
        params: dict[str, str] | None = None, data: bytes | None = None,
        headers: dict[str, str] | None = None, accept: tuple[int, ...] = (200,),
        max_bytes: int | None = None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """(status, headers (case-insensitive), body) of one attempt: `accept` lists the
        statuses the caller handles; a retriable failure raises Transient, any other
        StoreError. A body over `max_bytes` (by Content-Length) is not read: b"" then."""
        session = self._c
        hdrs = {**(headers or {}), **await self._auth()}
        # a stream, not bytes: aiohttp writes it in chunks without holding the loop
        body = io.BytesIO(data) if data is not None else None
        try:
            async with session.request(method, self.endpoint + path, params=params,
                                       data=body, headers=hdrs) as resp:
                if resp.status in accept:
                    headers_ = CIMultiDict(resp.headers)
                    if max_bytes is not None and (resp.content_length or 0) > max_bytes:
                        return resp.status, headers_, b""
                    return resp.status, headers_, await resp.read()
                answer = await resp.read()
        except (aiohttp.ClientError, OSError) as e:
            raise Transient(e) from e
        raise self._answer_error(op, key, resp.status, answer)

    def _answer_error(self, op: str, key: str | None, status: int, answer: bytes) -> Exception:
        """What an error answer becomes: Transient (try again) or a StoreError."""
        err = _HttpError(status, _error_message(answer))
        out = Transient(err) if status in remotestore.RETRIABLE_STATUS else \
            self._http_error(op, key, err)
        out.__cause__ = err  # what the retry loop and messages describe
        return out

    @contextlib.asynccontextmanager
    async def media(self, key: str, generation: str
                    ) -> AsyncIterator[aiohttp.ClientResponse | None]:
        """That generation of `key` as an open answer whose body the caller reads in
        pieces (None: it is gone); opening is retried, reading is the caller's."""

        async def open_() -> aiohttp.ClientResponse | None:
            try:
                resp = await self._c.get(self.endpoint + self._o(key), headers=await self._auth(),
                                         params={"alt": "media", "generation": generation})
                if resp.status == 200:
                    return resp
                answer = await resp.read()
                resp.release()
            except (aiohttp.ClientError, OSError) as e:
                raise Transient(e) from e
            if resp.status == 404:
                return None
            raise self._answer_error("get", key, resp.status, answer)

        resp = await self._retrying("get", key, open_)
        try:
            yield resp
        finally:
            if resp is not None:
                resp.release()

    def _http_error(self, op: str, key: str | None, e: _HttpError) -> StoreError:
        if e.status in (401, 403):
            why = Refusal.CREDENTIALS if e.status == 401 else Refusal.DENIED
            return self._refused(op, key, why, e.message)
        if e.status == 404 and "bucket" in e.message.lower():
            return self._refused(op, key, Refusal.MISSING, e.message)
        return self._refused(op, key, Refusal.FAILED, self._describe(e))

    def _o(self, key: str) -> str:
        return f"/storage/v1/b/{self.bucket}/o/{quote(self._full(key), safe='')}"

    # -- the Store interface ------------------------------------------------------

    def _upload(self, key: str, data: bytes, retain: bool = True) -> tuple[bytes, str]:
        """A multipart/related body: JSON metadata (name, MD5, retention) then the bytes."""
        meta: dict[str, Any] = {
            "name": self._full(key),
            "md5Hash": base64.b64encode(
                hashlib.md5(data, usedforsecurity=False).digest()).decode(),
        }
        ret = self.config.object_retention
        if ret is not None and retain:
            until = dt.datetime.now(dt.UTC) + dt.timedelta(days=ret.retain_days)
            meta["retention"] = {"mode": ret.mode,
                                 "retainUntilTime": until.isoformat().replace("+00:00", "Z")}
        boundary = uuid.uuid4().hex
        body = b"".join([
            f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode(),
            json.dumps(meta).encode(),
            f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode(),
            data, f"\r\n--{boundary}--\r\n".encode(),
        ])
        return body, f"multipart/related; boundary={boundary}"

    def _create_once(self, key: str, data: bytes, retain: bool) -> Callable[[], Awaitable[bool]]:
        body, content_type = self._upload(key, data, retain)

        async def put() -> bool:
            status, _, _ = await self._send_once(
                "put", key, "POST", f"/upload/storage/v1/b/{self.bucket}/o",
                params={"uploadType": "multipart", "ifGenerationMatch": "0"},
                data=body, headers={"Content-Type": content_type}, accept=(200, 412))
            return status == 200

        return put

    async def get(self, key: str, max_bytes: int | None = None) -> bytes | None:
        status, headers, body = await self._request(
            "get", key, "GET", self._o(key), params={"alt": "media"}, accept=(200, 404),
            max_bytes=max_bytes)
        if status != 200:
            return None
        size = int(headers.get("Content-Length", len(body)))
        if max_bytes is not None and size > max_bytes:  # from the answer's headers
            raise ObjectTooLargeError(self.url, key, size, max_bytes)
        return body

    async def get_prefix(self, key: str, length: int) -> tuple[bytes, int] | None:
        status, headers, body = await self._request(
            "get", key, "GET", self._o(key), params={"alt": "media"},
            headers={"Range": f"bytes=0-{max(length, 1) - 1}"}, accept=(200, 206, 404, 416))
        if status == 404:
            return None
        if status == 416:  # an empty object has no byte 0
            return b"", 0
        total = headers.get("Content-Range", "").rpartition("/")[2]
        return body[:length], int(total) if total.isdigit() else len(body)

    async def head(self, key: str) -> ObjectInfo | None:
        meta = await self.meta(key)
        if meta is None:
            return None
        # per-object retention, or the bucket's policy: whichever ends later binds
        until = [t for t in (_ms(meta.get("retention", {}).get("retainUntilTime")),
                             _ms(meta.get("retentionExpirationTime"))) if t is not None]
        return ObjectInfo(size=int(meta.get("size", 0)), modified_ms=_ms(meta.get("updated")) or 0,
                          retain_until_ms=max(until) if until else None)

    async def meta(self, key: str, generation: str | None = None) -> dict[str, Any] | None:
        """The metadata resource (size, generation, retention) of the object, or of that
        generation of it; None if absent."""
        params = {"generation": generation} if generation else None
        status, _, body = await self._request("head", key, "GET", self._o(key),
                                              params=params, accept=(200, 404))
        return json.loads(body) if status == 200 else None

    async def versioning(self) -> bool:
        """Whether the bucket keeps noncurrent generations."""
        _, _, body = await self._request("get bucket", None, "GET",
                                         f"/storage/v1/b/{self.bucket}",
                                         params={"fields": "versioning"})
        return bool(json.loads(body).get("versioning", {}).get("enabled"))

    async def exists(self, key: str) -> bool:
        return await self.meta(key) is not None

    async def delete(self, key: str) -> None:
        """Delete `key` (in a versioned bucket the generation becomes noncurrent)."""
        await self._request("delete", key, "DELETE", self._o(key), accept=(200, 204, 404))

    async def purge(self, key: str) -> None:
        """Delete every generation of `key` (what a plain delete leaves noncurrent in a
        versioned bucket); one under retention or a hold is refused: StoreError."""
        full = self._full(key)
        params = {"versions": "true", "fields": "items(name,generation),nextPageToken"}
        generations = [str(o["generation"]) async for items in self.pages(
            "list versions", key, params) for o in items if o["name"] == full]
        for generation in generations:
            await self._request("delete", key, "DELETE", self._o(key),
                                params={"generation": generation}, accept=(200, 204, 404))
        if not generations:
            await self.delete(key)

    async def _versions(self, prefix: str, start_after: str | None
                        ) -> AsyncIterator[tuple[str, bool]]:
        params = {"versions": "true", "fields": "items(name,timeDeleted),nextPageToken"}
        if start_after:
            params["startOffset"] = self._prefix + start_after
        async for items in self.pages("list versions", prefix, params):
            for obj in items:
                yield obj["name"], "timeDeleted" not in obj

    async def pages(self, op: str, prefix: str, params: dict[str, str]
                     ) -> AsyncIterator[list[dict[str, Any]]]:
        """The object resources under `prefix`, page by page, in name order."""
        params = {"prefix": self._prefix + prefix, **params}
        while True:
            _, _, body = await self._request(op, prefix, "GET",
                                             f"/storage/v1/b/{self.bucket}/o", params=params)
            page = json.loads(body)
            yield page.get("items", [])
            token = page.get("nextPageToken")
            if not token:
                return
            params["pageToken"] = token

    async def _names(self, prefix: str, start_after: str | None, limit: int | None
                     ) -> AsyncIterator[str]:
        params = {"maxResults": str(PAGE), "fields": "items(name),nextPageToken"}
        if start_after:  # startOffset is inclusive: list skips the key itself
            params["startOffset"] = self._prefix + start_after
        async for items in self.pages("list", prefix, params):
            for obj in items:
                yield obj["name"]

