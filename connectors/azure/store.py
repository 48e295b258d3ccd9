"""The Azure Blob Storage log store (azure-storage-blob, its aio client on aiohttp):
create-if-absent with `If-None-Match: *`.

The SDK's own retries are off (retry_total=0): every call goes through the shared retry
loop (daemon/remotestore.py), so a store's numbers mean the same on S3, GCS and Azure.
Credentials: an account key (SharedKey signing), a SAS token or a connection string, each
by reference. The SDK's loggers are held at WARNING: its INFO request logs are no place
for a SAS signature, even redacted.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar, Literal
from urllib.parse import unquote

import aiohttp
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import ContentSettings, ImmutabilityPolicy
from azure.storage.blob.aio import BlobServiceClient, ContainerClient
from pydantic import field_validator, model_validator

from drstream.daemon import remotestore
from drstream.daemon.errors import ConfigFieldError, StoreError
from drstream.daemon.remotestore import Refusal, Transient
from drstream.daemon.secrets import read_secret
from drstream.daemon.store import ObjectInfo, ObjectTooLargeError

logging.getLogger("azure").setLevel(logging.WARNING)

ACCOUNT_RE = re.compile(r"^[a-z0-9]{3,24}$")
CONTAINER_RE = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}$")
PAGE = 5000  # blobs per list page (the service's maximum)
# The variables the Azure CLI reads, used for az:// URLs (most specific first).
URL_CREDENTIAL_ENV = (
    ("connection_string", "AZURE_STORAGE_CONNECTION_STRING"),
    ("sas_token", "AZURE_STORAGE_SAS_TOKEN"),
    ("account_key", "AZURE_STORAGE_KEY"),
)
_CREDENTIAL_CODES = frozenset({"AuthenticationFailed", "AuthorizationFailure",
                               "InvalidAuthenticationInfo", "NoAuthenticationInformation"})
_EXISTS_CODES = frozenset({"BlobAlreadyExists", "ConditionNotMet"})


class ImmutabilityConfig(remotestore.RetentionConfig):
    """Version-level immutability (a container with it enabled): a time-based retention
    policy on every blob written; `Locked` cannot be shortened."""

    mode: Literal["Unlocked", "Locked"]


class AzureContainerConfig(remotestore.CloudStoreConfig):
    """Where a container prefix is and how to reach it: what the log store and the object
    source (objsource.py) both say."""

    type: Literal["azure"]
    account: str
    container: str
    # Secret references; exactly one. A connection string carries its own endpoint.
    account_key: str | None = None
    sas_token: str | None = None
    connection_string: str | None = None

    @field_validator("account")
    @classmethod
    def _account(cls, v: str) -> str:
        if not ACCOUNT_RE.match(v):
            raise ValueError(f"storage account name {v!r} is not valid (3-24 of a-z 0-9)")
        return v

    @field_validator("container")
    @classmethod
    def _container(cls, v: str) -> str:
        if not CONTAINER_RE.match(v):
            raise ValueError(f"container name {v!r} is not valid (3-63 of a-z 0-9 -, starting "
                             "with a letter or digit, no '--')")
        return v

    _refs = field_validator("account_key", "sas_token",
                            "connection_string")(remotestore.secret_ref)

    @model_validator(mode="after")
    def _one_credential(self) -> AzureContainerConfig:
        given = [n for n in ("account_key", "sas_token", "connection_string")
                 if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of account_key, sas_token and connection_string"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self


class AzureStoreConfig(AzureContainerConfig):
    immutability: ImmutabilityConfig | None = None


def retain_days(config: AzureStoreConfig) -> int | None:
    """Days a written blob stays immutable (prune never tries to delete it)."""
    return config.immutability.retain_days if config.immutability else None


def azure_config_from_url(url: str) -> AzureStoreConfig:
    """`az://account/container/prefix`; the credential is the first of
    AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_SAS_TOKEN, AZURE_STORAGE_KEY that is set
    (referenced, never copied), the endpoint is the account's public one unless the
    connection string names another."""
    expected = "az://account/container/prefix"
    parts = remotestore.split_url(url, "az", expected)
    container, _, prefix = unquote(parts.path).lstrip("/").partition("/")
    if not container:
        raise ConfigFieldError("store", url, f"expected {expected}")
    creds = {field: f"env:{env}" for field, env in URL_CREDENTIAL_ENV if os.environ.get(env)}
    if not creds:
        raise ConfigFieldError("store", url, "no Azure credential: set one of "
                               + ", ".join(env for _, env in URL_CREDENTIAL_ENV))
    field, ref = next(iter(creds.items()))
    return remotestore.config_from_url(AzureStoreConfig, url, {
        "type": "azure", "account": parts.netloc, "container": container, "prefix": prefix,
        field: ref,
    })


def _status(e: BaseException | None) -> int:
    return int(getattr(e, "status_code", 0) or 0)


def _code(e: BaseException | None) -> str:
    code = getattr(e, "error_code", None) or ""
    return str(getattr(code, "value", code))  # the SDK gives a StorageErrorCode enum


def _ms(when: dt.datetime | None) -> int | None:
    return int(when.timestamp() * 1000) if when is not None else None


class AzureStore(remotestore.RemoteStore[AzureStoreConfig, ContainerClient]):
    """A Store over one container and blob-name prefix of an Azure storage account;
    fencing rests on `If-None-Match: *`."""

    CREDENTIAL_FIELDS = "account_key, sas_token or connection_string"
    RETENTION = "an immutability policy or legal hold"
    # more options of the SDK's client (the object source bounds its reads)
    CLIENT_OPTIONS: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: AzureStoreConfig) -> None:
        super().__init__(
            config, f"az://{config.account}/{config.container}/{config.prefix}",
            config.endpoint_url or f"https://{config.account}.blob.core.windows.net",
            f"container {config.container!r}")
        self.container = config.container

    # -- lifecycle ---------------------------------------------------------------

    def _service_client(self) -> BlobServiceClient:
        c = self.config
        # our loop retries; the aiohttp transport's timeouts bound connect and each read
        opts: dict[str, Any] = {"retry_total": 0, "connection_timeout": c.connect_timeout_s,
                                "read_timeout": c.request_timeout_s, **self.CLIENT_OPTIONS}
        if c.connection_string is not None:
            cs = read_secret(c.connection_string, "store.connection_string")
            try:
                return BlobServiceClient.from_connection_string(cs, **opts)
            except ValueError:
                raise ConfigFieldError("store.connection_string", c.connection_string,
                                       "not an Azure storage connection string") from None
        credential: Any
        if c.account_key is not None:
            credential = {"account_name": c.account,
                          "account_key": read_secret(c.account_key, "store.account_key")}
        else:
            credential = read_secret(c.sas_token or "", "store.sas_token").lstrip("?")
        return BlobServiceClient(self.endpoint, credential=credential, **opts)

    async def _connect(self) -> None:
        service = self._service_client()
        self._opened.push_async_callback(service.close)
        self.endpoint = self.config.endpoint_url or service.url.rstrip("/")
        self._client = service.get_container_client(self.container)
        await self._check_container()

    async def _check_container(self) -> None:
        """Fail at open, clearly, on a missing container or refused credentials: a list of
        one name (what a container SAS allows; its properties it does not)."""
        await self._page("open", "", None, None, limit=1)

    # -- retries and error mapping -----------------------------------------------

    @staticmethod
    def _service_error(e: BaseException | None) -> str | None:
        if not isinstance(e, HttpResponseError):
            return None
        return f"HTTP {_status(e)} {_code(e) or getattr(e, 'reason', '') or ''}".strip()

    def _attempt_error(self, op: str, key: str | None, e: Exception) -> Exception | None:
        if isinstance(e, HttpResponseError):
            if _status(e) in remotestore.RETRIABLE_STATUS or (
                    _status(e) == 0 and not isinstance(e, ResourceExistsError)):
                return Transient(e)
            return self._http_error(op, key, e)
        if isinstance(e, ServiceRequestError | ServiceResponseError | aiohttp.ClientError
                      | OSError):
            return Transient(e)
        if isinstance(e, AzureError):  # bad parameters and the like: retrying cannot help
            return self._refused(op, key, Refusal.FAILED, self._describe(e))
        return None

    def _missing(self) -> str:
        return (f"container {self.container!r} does not exist in account "
                f"{self.config.account!r} at {self.endpoint}")

    def _http_error(self, op: str, key: str | None, e: HttpResponseError) -> StoreError:
        code = _code(e)
        if code == "ContainerNotFound":
            return self._refused(op, key, Refusal.MISSING, code)
        if code in _CREDENTIAL_CODES or isinstance(e, ClientAuthenticationError):
            return self._refused(op, key, Refusal.CREDENTIALS, code or str(_status(e)))
        if _status(e) == 403:
            return self._refused(op, key, Refusal.DENIED, code)
        return self._refused(op, key, Refusal.FAILED, self._describe(e))

    # -- the Store interface ------------------------------------------------------

    def _upload_args(self, retain: bool = True) -> dict[str, Any]:
        args: dict[str, Any] = {
            "overwrite": False,  # If-None-Match: *
            # a Content-MD5 the service checks against the bytes it received
            "validate_content": True,
            "content_settings": ContentSettings(content_type="application/octet-stream"),
        }
        imm = self.config.immutability
        if imm is not None and retain:
            args["immutability_policy"] = ImmutabilityPolicy(
                expiry_time=dt.datetime.now(dt.UTC) + dt.timedelta(days=imm.retain_days),
                policy_mode=imm.mode)
        return args

    def _create_once(self, key: str, data: bytes, retain: bool) -> Callable[[], Awaitable[bool]]:
        full, args = self._full(key), self._upload_args(retain)

        async def put() -> bool:
            try:
                await self._c.upload_blob(full, io.BytesIO(data), length=len(data), **args)
            except HttpResponseError as e:
                if _code(e) in _EXISTS_CODES or _status(e) == 412:
                    return False
                raise
            return True

        return put

    async def _download(self, key: str, offset: int | None, length: int | None,
                        max_bytes: int | None) -> tuple[bytes, int] | None:
        """(bytes, the blob's full size) of one ranged or whole read, None when absent."""
        full = self._full(key)

        async def get() -> tuple[bytes, int] | None:
            try:
                stream = await self._c.download_blob(full, offset=offset, length=length,
                                                     max_concurrency=1)
            except ResourceNotFoundError as e:
                if _code(e) == "ContainerNotFound":
                    raise
                return None
            except HttpResponseError as e:
                if _status(e) == 416:  # an empty blob has no byte 0
                    return b"", 0
                raise
            size = int(stream.properties.size)
            # the first answer's headers give the size; the rest of the body is not read
            if max_bytes is not None and size > max_bytes:
                raise ObjectTooLargeError(self.url, key, size, max_bytes)
            return await stream.readall(), size  # inside the retry: streams can break

        return await self._retrying("get", key, get)

    async def download(self, key: str) -> Any:
        """The SDK's downloader of `key` (its properties, then its bytes in pieces of the
        client's max_chunk_get_size), None when absent; opening is retried, reading is
        the caller's."""
        full = self._full(key)

        async def open_() -> Any:
            try:
                return await self._c.download_blob(full, max_concurrency=1)
            except ResourceNotFoundError as e:
                if _code(e) == "ContainerNotFound":
                    raise
                return None

        return await self._retrying("get", key, open_)

    async def page(self, op: str, start_from: str | None, marker: str | None
                   ) -> tuple[list[Any], str | None]:
        """One page of the blobs under the prefix (from the full name `start_from`) and
        the marker of the next (None: the last)."""
        return await self._page(op, "", start_from, marker)

    async def get(self, key: str, max_bytes: int | None = None) -> bytes | None:
        found = await self._download(key, None, None, max_bytes)
        return found[0] if found is not None else None

    async def get_prefix(self, key: str, length: int) -> tuple[bytes, int] | None:
        found = await self._download(key, 0, max(length, 1), None)
        return (found[0][:length], found[1]) if found is not None else None

    async def head(self, key: str) -> ObjectInfo | None:
        full = self._full(key)

        async def head() -> ObjectInfo | None:
            try:
                props = await self._c.get_blob_client(full).get_blob_properties()
            except ResourceNotFoundError as e:
                if _code(e) == "ContainerNotFound":
                    raise
                return None
            policy = getattr(props, "immutability_policy", None)
            return ObjectInfo(size=int(props.size), modified_ms=_ms(props.last_modified) or 0,
                              retain_until_ms=_ms(getattr(policy, "expiry_time", None)))

        return await self._retrying("head", key, head)

    async def exists(self, key: str) -> bool:
        full = self._full(key)

        async def exists() -> bool:
            return bool(await self._c.get_blob_client(full).exists())

        return await self._retrying("head", key, exists)

    async def delete(self, key: str) -> None:
        """Delete `key` (with versioning on, the current version becomes a prior one)."""
        full = self._full(key)

        async def delete() -> None:
            try:
                await self._c.delete_blob(full)
            except ResourceNotFoundError as e:
                if _code(e) == "ContainerNotFound":
                    raise

        await self._retrying("delete", key, delete)

    async def purge(self, key: str) -> None:
        """Delete `key` and every prior version of it (what a plain delete leaves with
        versioning on); one under an immutability policy or legal hold is refused."""
        full = self._full(key)
        # the current version too: once the blob is deleted it is a prior version
        versions = [b.version_id async for b in self._blob_versions(key, None)
                    if b.name == full and b.version_id]
        await self.delete(key)
        for version in versions:

            async def delete(version: str = version) -> None:
                try:
                    await self._c.delete_blob(full, version_id=version)
                except ResourceNotFoundError as e:
                    if _code(e) == "ContainerNotFound":
                        raise

            await self._retrying("delete version", key, delete)

    async def _blob_versions(self, prefix: str, start_after: str | None
                             ) -> AsyncIterator[Any]:
        """Every version of every blob under `prefix` (with versioning off: the blobs)."""
        marker: str | None = None
        start_from = self._prefix + start_after if start_after else None
        while True:
            items, marker = await self._page("list versions", prefix, start_from, marker,
                                             ["versions"])
            for blob in items:
                yield blob
            if marker is None:
                return

    async def _versions(self, prefix: str, start_after: str | None
                        ) -> AsyncIterator[tuple[str, bool]]:
        async for blob in self._blob_versions(prefix, start_after):
            yield str(blob.name), blob.version_id is None or bool(blob.is_current_version)

    async def _page(self, op: str, prefix: str, start_from: str | None, marker: str | None,
                    include: list[str] | None = None, limit: int = PAGE
                    ) -> tuple[list[Any], str | None]:
        """One page of blob items under `prefix` and the marker of the next (None: last)."""

        async def page() -> tuple[list[Any], str | None]:
            kw: dict[str, Any] = {"name_starts_with": self._prefix + prefix,
                                  "results_per_page": limit, "include": include}
            if start_from:
                kw["start_from"] = start_from
            pages: Any = self._c.list_blobs(**kw).by_page(continuation_token=marker)
            items = [b async for b in await pages.__anext__()]
            return items, pages.continuation_token or None

        return await self._retrying(op, prefix, page)

    async def _names(self, prefix: str, start_after: str | None, limit: int | None
                     ) -> AsyncIterator[str]:
        # start_from is inclusive (and a server that ignores it lists from the start):
        # list skips keys up to start_after either way.
        start_from = self._prefix + start_after if start_after else None
        marker: str | None = None
        while True:
            items, marker = await self._page("list", prefix, start_from, marker)
            for blob in items:
                yield str(blob.name)
            if marker is None:
                return

