"""Helpers for the MLflow replication tests: configs for ship + apply, a scripted history
on the primary, and comparing two registries (metadata and every artifact's sha256).

Registries are read with mlflow's own client (`MlflowClient`, `mlflow.artifacts`), not
with drstream's, so the comparison does not share code with what it checks. drstream's
own bookkeeping is left out of every comparison: tags starting with `drstream.` and the
sinks' checkpoint models (`drstream.checkpoint.*`).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from drstream.connectors.mlflow.events import SOURCE_TAG
from drstream.daemon.codec import EventBatch
from drstream.daemon.keyring import generate_key_file
from tests.infra.mlflow import MlflowServer
from tests.integration.applylib import KEY_ID, DrSetup, unique
from tests.integration.shiplib import Segment
from tests.support.procs import wait_for

INTERNAL = "drstream."
CHECKPOINT_MODEL_PREFIX = "drstream.checkpoint."
MiB = 1 << 20
SAFE_PREFIX = re.compile(r"[A-Za-z0-9._-]+")  # no quote or backslash ("_" matches itself too)

View = dict[str, Any]  # model name -> {description, tags, aliases, versions}


def client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def log_version(server: MlflowServer, model: str, files: dict[str, bytes],
                source_kind: str = "runs") -> tuple[int, str]:
    """Register a new version of `model` with `files` (test setup through mlflow itself)."""
    from mlflow.exceptions import MlflowException

    c = server.client()
    try:
        c.get_registered_model(model)
    except MlflowException:
        c.create_registered_model(model)
    run_id, source = log_run(c, files, source_kind)
    mv = c.create_model_version(model, source, run_id)
    return int(mv.version), run_id


def log_run(c: Any, files: dict[str, bytes], source_kind: str = "runs") -> tuple[str, str]:
    """A finished run holding `files` under `model/`: (run id, a version source for it)."""
    exp = c.get_experiment_by_name("drstream-tests") or None
    exp_id = exp.experiment_id if exp else c.create_experiment("drstream-tests")
    run = c.create_run(exp_id)
    with tempfile.TemporaryDirectory() as d:
        for rel, data in files.items():
            p = Path(d, rel)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        c.log_artifacts(run.info.run_id, d, "model")
    c.set_terminated(run.info.run_id)
    source = (f"runs:/{run.info.run_id}/model" if source_kind == "runs"
              else f"{run.info.artifact_uri}/model")
    return run.info.run_id, source


def versions_by_prefix(uri: str, prefix: str = "") -> dict[str, list[Any]]:
    """Every version of the models whose name starts with `prefix`, from one listing
    (filtered on the server when the prefix is plain ASCII): model name -> versions."""
    c = client(uri)
    where = f"name LIKE '{prefix}%'" if prefix and SAFE_PREFIX.fullmatch(prefix) else None
    out: dict[str, list[Any]] = {}
    token = None
    while True:
        page = c.search_model_versions(where, max_results=1000, page_token=token)
        for mv in page:
            if mv.name.startswith(prefix):
                out.setdefault(mv.name, []).append(mv)
        token = page.token
        if not token:
            return out


# --------------------------------------------------------------------------- configs


def write_mlflow_config(tmp_path: Path, *, primary: str, standby: str, prefix: str,
                        log_id: str | None = None, source: dict[str, Any] | None = None,
                        sink: dict[str, Any] | None = None, ship: dict[str, Any] | None = None,
                        apply: dict[str, Any] | None = None) -> DrSetup:
    """One flow primary registry -> log (file store) -> standby registry. Only models whose
    name starts with `prefix` are replicated (the servers are shared by the session)."""
    log_id = log_id or unique("mlflow")
    key_path = tmp_path / f"{log_id}.key"
    generate_key_file(key_path)
    raw: dict[str, Any] = {
        "log_id": log_id,
        "store": {"type": "file", "path": str(tmp_path / "store")},
        "keyring": {"active": KEY_ID, "keys": {KEY_ID: f"file:{key_path}"}},
        "sources": [{"type": "mlflow", "name": "primary", "tracking_uri": primary,
                     "interval_s": 1, "chunk_bytes": 4 * MiB,
                     "models": {"include": [re.escape(prefix) + ".*"]}, **(source or {})}],
        "ship": {"heartbeat_interval_s": 1, "flush_interval_s": 0.2, **(ship or {})},
        "sinks": [{"type": "mlflow", "name": "standby", "tracking_uri": standby,
                   "source": "mlflow:primary", **(sink or {})}],
        "apply": {"poll_max_s": 0.5, **(apply or {})},
        "service": {"ship_metrics_listen": None, "apply_metrics_listen": None},
        "logging": {"level": "info", "format": "json"},
    }
    path = tmp_path / f"{log_id}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return DrSetup(path, raw)


# --------------------------------------------------------------------------- reading


def _public(tags: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in tags.items() if not k.startswith(INTERNAL)}


def registry_view(uri: str, prefix: str = "") -> View:
    """Every registered model whose name starts with `prefix`: description, tags,
    aliases, and each version's description, tags and stage (drstream's own left out)."""
    c = client(uri)
    out: View = {}
    token = None
    while True:
        page = c.search_registered_models(max_results=200, page_token=token)
        for rm in page:
            if not rm.name.startswith(prefix) or rm.name.startswith(CHECKPOINT_MODEL_PREFIX):
                continue
            out[rm.name] = {"description": rm.description or "", "tags": _public(rm.tags),
                            "aliases": {a: int(v) for a, v in rm.aliases.items()},
                            "versions": {}}
        token = page.token
        if not token:
            break
    # one listing (a filter by exact name does not work for every name)
    for name, versions in versions_by_prefix(uri, prefix).items():
        if name in out:
            out[name]["versions"] = {int(mv.version): {
                "description": mv.description or "", "tags": _public(mv.tags),
                "stage": mv.current_stage} for mv in versions}
    return out


def file_digests(uri: str, name: str, version: int, dst: Path) -> dict[str, tuple[int, str]]:
    """Download a version's files (mlflow's client) and return path -> (size, sha256)."""
    import mlflow.artifacts

    where = client(uri).get_model_version_download_uri(name, str(version))
    dst.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=where, dst_path=str(tmp),
                                                         tracking_uri=uri))
        out = {}
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        for p in files:
            h = hashlib.sha256()
            with p.open("rb") as f:
                while block := f.read(4 * MiB):
                    h.update(block)
            rel = p.name if local.is_file() else p.relative_to(local).as_posix()
            out[rel] = (p.stat().st_size, h.hexdigest())
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def artifact_digests(uri: str, view: View, dst: Path) -> dict[tuple[str, int], Any]:
    return {(name, n): file_digests(uri, name, n, dst)
            for name, m in sorted(view.items()) for n in sorted(m["versions"])}


def view_diff(a: View, b: View, labels: tuple[str, str] = ("primary", "standby")) -> list[str]:
    """Human-readable differences between two views (empty when equal)."""
    out = []
    for name in sorted(set(a) | set(b)):
        if name not in b:
            out.append(f"model {name!r} only on the {labels[0]}")
            continue
        if name not in a:
            out.append(f"model {name!r} only on the {labels[1]}")
            continue
        for f in ("description", "tags", "aliases"):
            if a[name][f] != b[name][f]:
                out.append(f"model {name!r} {f}: {a[name][f]!r} != {b[name][f]!r}")
        va, vb = a[name]["versions"], b[name]["versions"]
        if sorted(va) != sorted(vb):
            out.append(f"model {name!r} versions {sorted(va)} != {sorted(vb)}")
        for n in sorted(set(va) & set(vb)):
            if va[n] != vb[n]:
                out.append(f"model {name!r} version {n}: {va[n]!r} != {vb[n]!r}")
    return out


def wait_equal(primary: str, standby: str, prefix: str, timeout: float,
               procs: Any = (), what: str = "standby equal to the primary") -> float:
    """Poll until the two registries' views are equal; returns the seconds it took."""
    started = time.monotonic()
    diffs: list[str] = []

    def equal() -> bool:
        nonlocal diffs
        diffs = view_diff(registry_view(primary, prefix), registry_view(standby, prefix))
        return not diffs

    try:
        wait_for(equal, timeout, what, procs, interval=0.3)
    except AssertionError as e:
        raise AssertionError(f"{e}\ndifferences:\n  " + "\n  ".join(diffs[:15])) from None
    return time.monotonic() - started


def wait_version(uri: str, name: str, version: int, timeout: float, procs: Any = ()) -> float:
    """Seconds until `name` version `version` exists on `uri` (READY); fails at once when
    one of `procs` exited."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    started = time.monotonic()

    def ready() -> bool:
        try:
            return bool(c.get_model_version(name, str(version)).status == "READY")
        except MlflowException:  # not there yet
            return False

    wait_for(ready, timeout, f"{name} version {version} on {uri}", procs, interval=0.1)
    return time.monotonic() - started


def check_equal_with_files(primary: MlflowServer, standby: MlflowServer, prefix: str,
                           tmp_path: Path) -> View:
    """The standby's models under `prefix` equal the primary's: names, numbers, tags,
    aliases, descriptions, stages, and every file's size and sha256. Returns the view."""
    a = registry_view(primary.tracking_uri, prefix)
    b = registry_view(standby.tracking_uri, prefix)
    assert not view_diff(a, b), view_diff(a, b)
    started = time.monotonic()
    files_a = artifact_digests(primary.tracking_uri, a, tmp_path / "dl-primary")
    files_b = artifact_digests(standby.tracking_uri, b, tmp_path / "dl-standby")
    print(f"artifact checksums of {sum(len(f) for f in files_a.values())} files compared "
          f"in {time.monotonic() - started:.1f}s")
    for key in files_a:
        assert files_b[key] == files_a[key], f"{key}: files differ\nprimary {files_a[key]}\n" \
                                             f"standby {files_b[key]}"
    assert files_a.keys() == files_b.keys()
    return a


def check_replica_tags(standby: MlflowServer, view: View, stream: str = "mlflow:primary"
                       ) -> None:
    """Every replicated model and version names its source; no version is left over."""
    c = client(standby.tracking_uri)
    for name, m in view.items():
        assert c.get_registered_model(name).tags.get(SOURCE_TAG) == f"{stream}/{name}"
        for n in m["versions"]:
            assert c.get_model_version(name, str(n)).tags.get(SOURCE_TAG) == \
                f"{stream}/{name}/{n}"


def state_view(state: dict[str, Any]) -> View:
    """A RegistryState (folded from a log) in the shape of registry_view."""
    return {name: {"description": m["description"], "tags": m["tags"],
                   "aliases": dict(m["aliases"]),
                   "versions": {int(n): {"description": v["description"], "tags": v["tags"],
                                         "stage": v["stage"]}
                                for n, v in m["versions"].items()}}
            for name, m in state["models"].items()}


def log_events(segments: list[Segment], stream: str) -> list[dict[str, Any]]:
    """The registry events of `stream` in the segments, in log order."""
    return [ev for s in segments for b in s.body.batches
            if isinstance(b, EventBatch) and b.stream == stream for ev in b.events]


def rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


# --------------------------------------------------------------------------- history


def write_file(path: Path, size: int, seed: int, block: int = 4 * MiB) -> None:
    """`size` pseudo-random bytes written block by block (never held in memory at once)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        left = size
        while left > 0:
            n = min(block, left)
            f.write(rng.randbytes(n))
            left -= n


@dataclass
class History:
    """The scripted registry history of issue 6, step by step on the primary.

    `steps` is a list of (label, callable); `run()` performs them in order with
    `pause_s` between steps, so the source sees intermediate states too."""

    uri: str
    prefix: str
    workdir: Path
    big_bytes: int = 200 * MiB
    pause_s: float = 0.5
    steps: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    big_version: tuple[str, int] | None = None

    def __post_init__(self) -> None:
        self.c = client(self.uri)
        self.exp_id = self.c.create_experiment(f"{self.prefix}-exp")
        p = self.prefix
        a, b, c, d = f"{p}-fraud", f"{p}-ranker", f"{p}-old", f"{p}-tmp"
        self.names = {"a": a, "b": b, "c": c, "d": d, "renamed": f"{p}-ranker-v2"}
        s = self.steps
        s.append(("create models", lambda: self._create_models(a, b, c, d)))
        s.append(("version a1", lambda: self._version(a, "a1", small=True)))
        s.append(("version b1 (big)", lambda: self._version(b, "b1", big=True)))
        s.append(("version a2", lambda: self._version(a, "a2", small=True)))
        s.append(("version c1 + c2", lambda: (self._version(c, "c1", small=True),
                                               self._version(c, "c2", small=True))))
        s.append(("tags", self._tags))
        s.append(("aliases", self._aliases))
        s.append(("descriptions", self._descriptions))
        s.append(("stages", self._stages))
        s.append(("version a3 then delete a2", self._delete_version))
        s.append(("version a4 deleted at once, then a5", self._gap))
        s.append(("tag and alias deletions", self._deletions))
        s.append(("rename", lambda: self.c.rename_registered_model(b, self.names["renamed"])))
        s.append(("delete model", lambda: self.c.delete_registered_model(c)))
        s.append(("version after rename", lambda: self._version(self.names["renamed"], "r2",
                                                                small=True)))

    def _create_models(self, *names: str) -> None:
        for n in names:
            self.c.create_registered_model(n, tags={"team": "ml"}, description=f"model {n}")

    def _version(self, name: str, label: str, small: bool = False, big: bool = False) -> int:
        d = self.workdir / label / "model"
        (d / "MLmodel").parent.mkdir(parents=True, exist_ok=True)
        (d / "MLmodel").write_text(f"artifact_path: model\nlabel: {label}\n")
        (d / "conda.yaml").write_text("dependencies: [python=3.11]\n")
        write_file(d / "data" / "weights.bin", 3 * MiB + 123 if small else 64 * 1024,
                   seed=sum(label.encode()))
        (d / "data" / "empty").write_bytes(b"")
        if big:
            write_file(d / "data" / "big.bin", self.big_bytes, seed=7)
        run = self.c.create_run(self.exp_id, run_name=label)
        self.c.log_artifacts(run.info.run_id, str(d), artifact_path="model")
        self.c.set_terminated(run.info.run_id)
        shutil.rmtree(self.workdir / label, ignore_errors=True)
        mv = self.c.create_model_version(name, f"runs:/{run.info.run_id}/model",
                                         run_id=run.info.run_id, tags={"label": label})
        if big:
            self.big_version = (name, int(mv.version))
        return int(mv.version)

    def _tags(self) -> None:
        a, b = self.names["a"], self.names["b"]
        self.c.set_registered_model_tag(a, "owner", "alice")
        self.c.set_registered_model_tag(a, "scratch", "x")
        self.c.set_model_version_tag(a, "1", "validated", "true")
        self.c.set_model_version_tag(b, "1", "scratch", "y")

    def _aliases(self) -> None:
        a, b = self.names["a"], self.names["b"]
        self.c.set_registered_model_alias(a, "champion", "1")
        self.c.set_registered_model_alias(a, "challenger", "2")
        self.c.set_registered_model_alias(b, "prod", "1")

    def _descriptions(self) -> None:
        a = self.names["a"]
        self.c.update_registered_model(a, description="fraud detector, updated")
        self.c.update_model_version(a, "1", description="first good one")

    def _stages(self) -> None:
        a, b = self.names["a"], self.names["b"]
        # stages are deprecated in MLflow (FutureWarning) but still served and replicated
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.c.transition_model_version_stage(a, "1", "Production")
            self.c.transition_model_version_stage(a, "2", "Staging")
            self.c.transition_model_version_stage(b, "1", "Archived")

    def _delete_version(self) -> None:
        a = self.names["a"]
        self._version(a, "a3", small=True)
        self.c.set_registered_model_alias(a, "champion", "3")
        self.c.delete_model_version(a, "2")  # drops its alias "challenger"

    def _gap(self) -> None:
        """A version the source most likely never sees: the standby must still number the
        next one 5 (a placeholder 4 made and deleted there)."""
        a = self.names["a"]
        four = self._version(a, "a4", small=True)
        self.c.delete_model_version(a, str(four))
        self._version(a, "a5", small=True)

    def _deletions(self) -> None:
        a, b = self.names["a"], self.names["b"]
        self.c.delete_registered_model_tag(a, "scratch")
        self.c.delete_model_version_tag(b, "1", "scratch")
        self.c.delete_registered_model_alias(a, "champion")
        self.c.set_registered_model_alias(a, "champion", "1")

    def run(self, pause_s: float | None = None, on_step: Callable[[str], None] | None = None
            ) -> None:
        pause = self.pause_s if pause_s is None else pause_s
        for label, step in self.steps:
            step()
            if on_step is not None:
                on_step(label)
            if pause:
                time.sleep(pause)


def big_file_env() -> int:
    """Size of the big artifact (DRSTREAM_MLFLOW_BIG_MB overrides the 200 MB default)."""
    return int(os.environ.get("DRSTREAM_MLFLOW_BIG_MB", "200")) * MiB


# --------------------------------------------------------------------------- races


class RegistryProxy:
    """An HTTP proxy in front of a real MLflow server, owned by a test, to make a change
    land exactly between two calls of the code under test.

    Every request is forwarded unchanged. `arm(endpoint, change)` makes the next request
    to `endpoint` (a path under /api/2.0/mlflow/, e.g. "model-versions/search") run
    `change` first (a real change, made on the server directly, not through the proxy),
    or with `after=True` once the server answered and before the answer is passed on.
    The proxy runs its own event loop in a thread, like tests/infra/tcp_proxy.py."""

    def __init__(self, upstream: str) -> None:
        import asyncio
        import threading

        self.upstream = upstream.rstrip("/")
        self.port = 0
        self.hits: dict[str, int] = {}
        self._armed: list[tuple[str, Callable[[], None], bool]] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="registry-proxy")
        self._runner: Any = None
        self._session: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RegistryProxy:
        import asyncio

        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def stop(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> RegistryProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def arm(self, endpoint: str, change: Callable[[], None], *, after: bool = False,
            times: int = 1) -> None:
        with self._lock:
            self._armed += [(endpoint, change, after)] * times

    def armed(self) -> int:
        with self._lock:
            return len(self._armed)

    def _take(self, endpoint: str, after: bool) -> Callable[[], None] | None:
        with self._lock:
            for i, (e, change, a) in enumerate(self._armed):
                if e == endpoint and a == after:
                    del self._armed[i]
                    return change
        return None

    async def _start(self) -> None:
        import aiohttp
        from aiohttp import web

        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _stop(self) -> None:
        await self._runner.cleanup()
        await self._session.close()

    async def _run(self, endpoint: str, after: bool) -> None:
        import asyncio

        change = self._take(endpoint, after)
        if change is not None:
            await asyncio.get_running_loop().run_in_executor(None, change)

    async def _forward(self, request: Any) -> Any:
        from aiohttp import web
        from yarl import URL

        endpoint = request.path.split("/api/2.0/mlflow/", 1)[-1]
        self.hits[endpoint] = self.hits.get(endpoint, 0) + 1
        await self._run(endpoint, after=False)
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length", "transfer-encoding")}
        url = URL(self.upstream + request.raw_path, encoded=True)  # as the client sent it
        async with self._session.request(request.method, url, headers=headers,
                                         data=await request.read()) as up:
            body = await up.read()
            status, ctype = up.status, up.headers.get("Content-Type")
        await self._run(endpoint, after=True)
        out = web.Response(status=status, body=body)
        if ctype:
            out.headers["Content-Type"] = ctype
        return out
