"""Cloud storage emulators for tests: fake-gcs-server (the GCS JSON API) and Azurite (the
Azure Blob REST API), each its own process on a free loopback port, stopped by pid.

Both keep data in memory, so a restart loses every bucket or container: outages that
must keep data go through tests/infra/tcp_proxy.py, as for S3. The binaries are installed
into the cache by .ci/install-tools.sh (`make install`); a missing one fails the run.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

from tests.infra.procs import (
    CACHE_DIR,
    RUN_DIR,
    Proc,
    ServiceStartError,
    free_port,
    start_process,
    wait_until,
)

FAKE_GCS_VERSION = "1.56.1"
AZURITE_VERSION = "3.37.0"
TOOLS = CACHE_DIR / "tools"
FAKE_GCS_BIN = TOOLS / f"fake-gcs-server-{FAKE_GCS_VERSION}" / "fake-gcs-server"
AZURITE_BIN = TOOLS / f"azurite-{AZURITE_VERSION}" / "node_modules" / ".bin" / "azurite-blob"

# Azurite's built-in account: its documented development credentials, public by design.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
               "KBHBeksoGMGw==")
# Store configs name credentials by reference; the azure_creds_env fixture sets this.
AZURE_KEY_ENV = "DRS_TEST_AZURE_KEY"


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _request(port: int, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class _Emulator:
    """One emulator process on a free loopback port."""

    kind = ""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.proc: Proc | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return RUN_DIR / self.kind / f"{self.name}-{self.port}" / "server.log"

    def log_tail(self, lines: int = 40) -> str:
        return self.proc.log_tail(lines) if self.proc else "(not started)"

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _answers(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> None:
        """Start on a free port; retries a port lost to a race."""
        for attempt in range(3):
            self.port = free_port()
            self.proc = start_process(self.name, self._argv(), self.log_path,
                                      cwd=self.log_path.parent)
            try:
                wait_until(self._answers, timeout, self.proc, "HTTP answers")
                return
            except ServiceStartError:
                self.proc.stop()
                if attempt == 2 or "in use" not in self.proc.log_tail():
                    raise

    def stop(self) -> None:
        # Azurite waits for idle keep-alive connections before it exits: a short grace
        if self.proc is not None:
            self.proc.stop(timeout=5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()


def _require(binary: Path, what: str) -> None:
    if not binary.exists():
        raise ServiceStartError(
            f"{what} is not installed at {binary}; run `make install` (.ci/install-tools.sh)")


class FakeGcsServer(_Emulator):
    """fake-gcs-server, memory backend (the one with object versioning), plain HTTP."""

    kind = "gcs"

    def _argv(self) -> list[str]:
        _require(FAKE_GCS_BIN, f"fake-gcs-server {FAKE_GCS_VERSION}")
        return [str(FAKE_GCS_BIN), "-backend", "memory", "-scheme", "http",
                "-host", "127.0.0.1", "-port", str(self.port),
                "-public-host", f"127.0.0.1:{self.port}", "-log-level", "warn"]

    def _answers(self) -> bool:
        return _request(self.port, "GET", "/storage/v1/b")[0] == 200

    def create_bucket(self, name: str | None = None, versioning: bool = False) -> str:
        name = name or unique_name()
        body = json.dumps({"name": name, "versioning": {"enabled": versioning}}).encode()
        status, text = _request(self.port, "POST", "/storage/v1/b", body,
                                {"Content-Type": "application/json"})
        if status != 200:
            raise RuntimeError(f"fake-gcs-server: create bucket {name}: {status} {text!r}")
        return name

    def object_names(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object name under `prefix`, read directly from the server."""
        names: list[str] = []
        token = ""
        while True:
            q = urllib.parse.urlencode({"prefix": prefix, "pageToken": token})
            status, text = _request(self.port, "GET", f"/storage/v1/b/{bucket}/o?{q}")
            if status != 200:
                raise RuntimeError(f"fake-gcs-server: list {bucket}: {status} {text!r}")
            page = json.loads(text)
            names += [o["name"] for o in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return names

    def delete_bucket(self, name: str) -> None:
        """Best effort: remove the objects, then the bucket."""
        with contextlib.suppress(Exception):
            for obj in self.object_names(name):
                _request(self.port, "DELETE",
                         f"/storage/v1/b/{name}/o/{urllib.parse.quote(obj, safe='')}")
            _request(self.port, "DELETE", f"/storage/v1/b/{name}")

    def store_fields(self, bucket: str, prefix: str = "", **overrides: object) -> dict[str, Any]:
        """Raw `store:` config for this server (no credentials: the emulator takes none),
        fast retries for tests."""
        return {
            "type": "gcs", "bucket": bucket, "prefix": prefix,
            "endpoint_url": self.endpoint_url, "anonymous": True,
            "max_attempts": 3, "backoff_base_s": 0.05, "backoff_max_s": 0.2,
            "request_timeout_s": 30.0, **overrides,
        }


class AzuriteServer(_Emulator):
    """Azurite's blob service, in memory, path-style URLs (`/<account>/<container>`)."""

    kind = "azurite"

    def _argv(self) -> list[str]:
        _require(AZURITE_BIN, f"Azurite {AZURITE_VERSION}")
        return [str(AZURITE_BIN), "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
                "--inMemoryPersistence", "--skipApiVersionCheck", "--disableProductStyleUrl",
                "--silent"]

    def _answers(self) -> bool:
        # an unsigned request gets an error answer: any HTTP answer means it serves
        return _request(self.port, "GET", f"/{AZURITE_ACCOUNT}?comp=list")[0] > 0

    @property
    def account_url(self) -> str:
        return f"{self.endpoint_url}/{AZURITE_ACCOUNT}"

    def _client(self) -> Any:
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient(self.account_url, credential={
            "account_name": AZURITE_ACCOUNT, "account_key": AZURITE_KEY})

    def create_container(self, name: str | None = None) -> str:
        name = name or unique_name()
        with self._client() as client:
            client.create_container(name)
        return name

    def blob_names(self, container: str, prefix: str = "") -> list[str]:
        with self._client() as client:
            return [b.name for b in client.get_container_client(container).list_blobs(
                name_starts_with=prefix)]

    def delete_container(self, name: str) -> None:
        with contextlib.suppress(Exception), self._client() as client:
            client.delete_container(name)

    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
                f"AccountKey={AZURITE_KEY};BlobEndpoint={self.account_url};")

    def store_fields(self, container: str, prefix: str = "",
                     **overrides: object) -> dict[str, Any]:
        """Raw `store:` config for this server (needs azure_creds_env), fast retries."""
        return {
            "type": "azure", "account": AZURITE_ACCOUNT, "container": container,
            "prefix": prefix, "endpoint_url": self.account_url,
            "account_key": f"env:{AZURE_KEY_ENV}",
            "max_attempts": 3, "backoff_base_s": 0.05, "backoff_max_s": 0.2,
            "request_timeout_s": 30.0, **overrides,
        }
