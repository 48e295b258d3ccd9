"""An S3 API server for tests: moto in server mode, its own process on a free loopback port.

A separate process (not moto's in-process mock or ThreadedMotoServer) so tests can stop
and kill it by pid like a real service. moto keeps everything in memory, so a restart
loses every bucket: outages that must keep data go through tests/infra/tcp_proxy.py.
"""

from __future__ import annotations

import contextlib
import http.client
import sys
import threading
import uuid
from typing import Any

import boto3
from botocore.config import Config

from tests.infra.procs import RUN_DIR, Proc, ServiceStartError, free_port, start_process, wait_until

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"
# Store configs name credentials by reference; the s3_creds_env fixture sets these.
KEY_ENV = "DRS_TEST_S3_KEY"
SECRET_ENV = "DRS_TEST_S3_SECRET"


def unique_bucket_name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _answers_http(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/moto-api/")
        conn.getresponse().read()
        return True  # any HTTP answer means the server is serving
    finally:
        conn.close()


class S3Server:
    """One moto server process; `endpoint_url` plus the fixed test credentials."""

    access_key = ACCESS_KEY
    secret_key = SECRET_KEY
    region = REGION

    def __init__(self, name: str = "moto-s3") -> None:
        self.name = name
        self.port = 0
        self.proc: Proc | None = None
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start_new(cls, name: str = "moto-s3", timeout: float = 60.0) -> S3Server:
        server = cls(name)
        server.start(timeout=timeout)
        return server

    def start(self, port: int | None = None, timeout: float = 60.0) -> None:
        """Start on `port` (default: a free one); retries a port lost to a race."""
        for attempt in range(3):
            self.port = port or free_port()
            log_path = RUN_DIR / "s3" / f"{self.name}-{self.port}" / "server.log"
            self.proc = start_process(
                self.name,
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                log_path,
                env={"PYTHONUNBUFFERED": "1"},
            )
            try:
                wait_until(lambda: _answers_http(self.port), timeout, self.proc, "HTTP answers")
                return
            except ServiceStartError:
                self.proc.stop()
                if port is not None or attempt == 2 or "in use" not in self.proc.log_tail():
                    raise

    def restart(self, timeout: float = 60.0) -> None:
        """Stop and start again on the same port; moto forgets all data."""
        self.stop()
        self.start(port=self.port, timeout=timeout)

    def stop(self) -> None:
        self._close_client()
        if self.proc is not None:
            self.proc.stop()

    def kill(self) -> None:
        self._close_client()
        if self.proc is not None:
            self.proc.kill()
            self.proc.stop()  # removes the pid file

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    # -- direct access (setup and verification, bypassing the code under test) ---

    def new_client(self, service: str = "s3", **creds: str) -> Any:
        """A fresh boto3 client; the caller closes it."""
        return boto3.session.Session().client(
            service,
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=creds.get("access_key", self.access_key),
            aws_secret_access_key=creds.get("secret_key", self.secret_key),
            config=Config(retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=30),
        )

    @property
    def client(self) -> Any:
        """A shared boto3 S3 client, closed by stop()."""
        with self._lock:
            if self._client is None:
                self._client = self.new_client()
            return self._client

    def _close_client(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def create_bucket(self, name: str | None = None, object_lock: bool = False) -> str:
        """Create a bucket (Object Lock implies versioning); returns its name."""
        name = name or unique_bucket_name()
        args: dict[str, Any] = {"Bucket": name}
        if object_lock:
            args["ObjectLockEnabledForBucket"] = True
        self.client.create_bucket(**args)
        return name

    def delete_bucket(self, name: str) -> None:
        """Delete a bucket and every object version in it (best effort for locked ones)."""
        c = self.client
        for page in c.get_paginator("list_object_versions").paginate(Bucket=name):
            versions = page.get("Versions", []) + page.get("DeleteMarkers", [])
            for i in range(0, len(versions), 1000):
                batch = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                         for v in versions[i : i + 1000]]
                with contextlib.suppress(Exception):
                    c.delete_objects(Bucket=name, Delete={"Objects": batch, "Quiet": True})
        with contextlib.suppress(Exception):
            c.delete_bucket(Bucket=name)

    def object_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key in `bucket` under `prefix`, read directly from the server."""
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix
        ):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys

    def enable_iam_auth(self) -> None:
        """From now on every request must be signed by an IAM access key moto knows.

        moto skips auth by default; this flips its server-wide switch, so only use it
        on a server of your own (start_new), never on the shared session server.
        """
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("POST", "/moto-api/reset-auth", body=b"0")
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"moto reset-auth answered {resp.status}")
        finally:
            conn.close()

    def create_iam_access_key(self, user: str = "drstream-test") -> tuple[str, str]:
        """An IAM user allowed s3:* and a fresh access key for it (before enable_iam_auth)."""
        iam = self.new_client("iam")
        try:
            iam.create_user(UserName=user)
            iam.put_user_policy(
                UserName=user, PolicyName="s3-all",
                PolicyDocument='{"Version": "2012-10-17", "Statement": [{"Effect": "Allow",'
                ' "Action": "s3:*", "Resource": "*"}]}',
            )
            key = iam.create_access_key(UserName=user)["AccessKey"]
        finally:
            iam.close()
        return key["AccessKeyId"], key["SecretAccessKey"]

    def store_fields(self, bucket: str, prefix: str = "", **overrides: object) -> dict[str, object]:
        """Raw `store:` config for this server, fast retries for tests (needs s3_creds_env)."""
        return {
            "type": "s3", "bucket": bucket, "prefix": prefix,
            "endpoint_url": self.endpoint_url, "region": self.region,
            "access_key_id": f"env:{KEY_ENV}", "secret_access_key": f"env:{SECRET_ENV}",
            "max_attempts": 3, "backoff_base_s": 0.05, "backoff_max_s": 0.2,
            "connect_timeout_s": 2.0, "read_timeout_s": 10.0, "request_timeout_s": 30.0,
            **overrides,
        }

    def store_env(self) -> dict[str, str]:
        """AWS_* variables for a process that should reach this server via s3:// URLs."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }
