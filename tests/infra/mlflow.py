"""Real MLflow tracking servers for tests: `mlflow server` as its own process.

Each server has its own work directory under the run directory (SQLite backend store,
local artifacts destination served through `--serve-artifacts`, server.log), a free
loopback port, and a pid file like every other launcher (tests/infra/procs.py).
Webhooks to http loopback targets are allowed (test-only settings), the webhook secret
encryption key is generated once per work directory so a restart can still decrypt the
secrets it stored, and the webhook list cache is short so a webhook registered during a
test is used at once.

`stop()`/`start()` (or `restart()`) keep the work directory and port: the registry comes
back with everything it had (the "primary unreachable" tests).
"""

from __future__ import annotations

import base64
import http.client
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

from tests.infra.procs import RUN_DIR, Proc, ServiceStartError, free_port, start_process, wait_until

START_TIMEOUT = 120.0
WEBHOOK_CACHE_TTL_S = 1  # MLflow caches the webhook list per event (default 60 s)


def _mlflow_bin() -> str:
    exe = Path(sys.executable).with_name("mlflow")
    if not exe.exists():
        raise ServiceStartError(f"mlflow is not installed next to {sys.executable} "
                                "(pip install -e '.[test]')")
    return str(exe)


def _health(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200
    finally:
        conn.close()


class MlflowServer:
    """One `mlflow server` process: SQLite registry + served local artifacts."""

    def __init__(self, name: str = "mlflow", workdir: Path | None = None) -> None:
        self.name = name
        self.workdir = workdir or RUN_DIR / "mlflow" / f"{name}-{uuid.uuid4().hex[:8]}"
        self.port = 0
        self.proc: Proc | None = None

    # -- where things are ------------------------------------------------------

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.workdir / "mlflow.db"

    @property
    def artifacts_dir(self) -> Path:
        return self.workdir / "artifacts"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def __repr__(self) -> str:
        return f"MlflowServer({self.name!r}, {self.tracking_uri}, {self.workdir})"

    def _encryption_key(self) -> str:
        """A Fernet key (32 random bytes, url-safe base64), kept in the work directory."""
        path = self.workdir / "webhook-encryption.key"
        if not path.exists():
            path.write_text(base64.urlsafe_b64encode(os.urandom(32)).decode())
            path.chmod(0o600)
        return path.read_text().strip()

    def env(self) -> dict[str, str]:
        return {
            "PYTHONUNBUFFERED": "1",
            "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
            "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": self._encryption_key(),
            "MLFLOW_WEBHOOK_CACHE_TTL": str(WEBHOOK_CACHE_TTL_S),
            "MLFLOW_DISABLE_TELEMETRY": "true",
            # no background job runner (huey consumers): nothing here needs it, and it
            # costs several processes per server on a 2-core machine
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "DO_NOT_TRACK": "true",
        }

    # -- lifecycle ---------------------------------------------------------------

    @classmethod
    def start_new(cls, name: str = "mlflow", timeout: float = START_TIMEOUT) -> MlflowServer:
        server = cls(name)
        server.start(timeout=timeout)
        return server

    def start(self, port: int | None = None, timeout: float = START_TIMEOUT) -> MlflowServer:
        """Start (again) on `port`, or the previous port, or a free one; waits for /health."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.artifacts_dir.mkdir(exist_ok=True)
        fixed = port or self.port or None
        for attempt in range(3):
            self.port = fixed or free_port()
            argv = [
                _mlflow_bin(), "server",
                "--backend-store-uri", f"sqlite:///{self.db_path}",
                "--serve-artifacts", "--artifacts-destination", str(self.artifacts_dir),
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            ]
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.proc = start_process(self.name, argv, self.log_path, env=self.env(),
                                      cwd=self.workdir)
            try:
                wait_until(lambda: _health(self.port), timeout, self.proc, "/health answers 200")
                return self
            except ServiceStartError:
                self.proc.stop()
                tail = self.log_path.read_bytes()[offset:].decode(errors="replace")
                in_use = "already in use" in tail or "address in use" in tail.lower()
                if fixed is not None or attempt == 2 or not in_use:
                    raise
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=timeout)

    def restart(self, timeout: float = START_TIMEOUT) -> MlflowServer:
        """Stop and start on the same port and work directory (the registry is kept)."""
        self.stop()
        return self.start(port=self.port, timeout=timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def log_tail(self, lines: int = 60) -> str:
        return self.proc.log_tail(lines) if self.proc is not None else "(not started)"

    def remove(self) -> None:
        """Stop and delete the work directory."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MlflowServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- direct access (setup and verification, bypassing the code under test) ------

    def client(self) -> Any:
        """A synchronous `mlflow.MlflowClient` for this server (test setup only)."""
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)


def start_servers(names: tuple[str, ...] = ("primary", "standby"),
                  timeout: float = START_TIMEOUT) -> list[MlflowServer]:
    """Start several servers in parallel (their start is mostly Python import time)."""
    servers = [MlflowServer(f"mlflow-{n}") for n in names]
    errors: list[BaseException] = []
    import threading

    def run(s: MlflowServer) -> None:
        try:
            s.start(timeout=timeout)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for s in servers:
            s.stop()
        raise errors[0]
    return servers
