"""An async client for one MLflow registry: the REST API and the proxied artifact store.

Plain REST over aiohttp rather than mlflow's `MlflowClient`: every call is one HTTP
request on the event loop (no thread per call), artifacts stream in fixed-size chunks in
both directions (MlflowClient downloads whole files to disk), errors are classified by
HTTP status in one place, and the daemon does not import the mlflow package at all.

Artifacts go through the tracking server's `mlflow-artifacts` endpoints
(`mlflow server --serve-artifacts`). A version's files are found from its download URI:
`mlflow-artifacts:/...` is used directly, `runs:/<run>/<path>` through the run's artifact
URI, `models:/<model id>` through the logged model's artifact location.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import re
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlparse

import aiohttp

from drstream.connectors.mlflow.config import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_REQUEST_TIMEOUT_S,
    ModelSelection,
)
from drstream.connectors.mlflow.events import is_internal_model, public_tags
from drstream.daemon.errors import DrstreamError

API = "/api/2.0/mlflow"
ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
PAGE_SIZE = 1000
CONNECT_TIMEOUT_S = 10.0
READY = "READY"
RETRIABLE_STATUSES = frozenset({408, 425, 429})
# A snapshot whose listings disagree (a model renamed, re-created or deleted between the
# calls) is taken again up to this many times, this far apart, before the models that
# keep moving are left as they were shipped (each attempt is three listings, ~10 ms on
# a quiet registry of a few hundred models).
SNAPSHOT_ATTEMPTS = 3
SNAPSHOT_RETRY_S = 0.2
ALL_WEBHOOK_EVENTS = (
    ("REGISTERED_MODEL", "CREATED"),
    ("MODEL_VERSION", "CREATED"),
    ("MODEL_VERSION_TAG", "SET"),
    ("MODEL_VERSION_TAG", "DELETED"),
    ("MODEL_VERSION_ALIAS", "CREATED"),
    ("MODEL_VERSION_ALIAS", "DELETED"),
)


class MlflowApiError(DrstreamError):
    """An MLflow registry call failed. `retriable` for connection errors, timeouts, 5xx
    and 429; not for other 4xx. The message names the registry, the call and the object."""

    def __init__(self, message: str, *, status: int | None = None,
                 error_code: str | None = None, retriable: bool | None = None) -> None:
        super().__init__(message, retriable=retriable)
        self.status = status
        self.error_code = error_code

    @property
    def not_found(self) -> bool:
        return self.error_code == "RESOURCE_DOES_NOT_EXIST" or self.status == 404

    @property
    def already_exists(self) -> bool:
        return self.error_code == "RESOURCE_ALREADY_EXISTS"


@dataclass(frozen=True)
class ArtifactFile:
    path: str  # relative to the version's artifact root, posix
    size: int


@dataclass
class Snapshot:
    """A registry state (RegistryState shape) and the versions whose artifacts are not
    known yet (their `artifacts` is [] until the caller captures them). `narrowed`: the
    models whose listings kept disagreeing, left as they were known."""

    state: dict[str, Any]
    missing: list[tuple[str, int]] = field(default_factory=list)
    narrowed: list[str] = field(default_factory=list)


def name_filter(name: str) -> str:
    """A search filter that selects model `name` (and maybe others: keep exact matches).

    MLflow 3 takes a quoted string literally, quotes and backslashes included (`'it\\'s'`
    means `it\\'s`), so a name is quoted with the quote it does not hold. A name with
    both quotes or a backslash (which some databases take as a LIKE escape, and which
    can end a literal early) is matched with LIKE, each of those characters as `_`."""
    if "\\" not in name and "'" not in name:
        return f"name = '{name}'"
    if "\\" not in name and '"' not in name:
        return f'name = "{name}"'
    return "name LIKE '{}'".format(re.sub(r"['\"\\\\]", "_", name))


def tags_of(items: list[dict[str, Any]] | None) -> dict[str, str]:
    """A REST `tags` list as a dict."""
    return {t["key"]: t.get("value", "") for t in items or []}


def model_entry(rm: dict[str, Any]) -> dict[str, Any]:
    """A REST registered model in RegistryState shape (public tags, no versions yet; its
    creation time, when the registry reports one, is its identity)."""
    entry = {"description": rm.get("description") or "",
             "tags": public_tags(tags_of(rm.get("tags"))),
             "aliases": {a["alias"]: int(a["version"]) for a in rm.get("aliases", [])},
             "versions": {}}
    created = _int_or_none(rm.get("creation_timestamp"))
    if created is not None:
        entry["created_ms"] = created
    return entry


def _int_or_none(v: Any) -> int | None:
    try:
        return int(v) if v is not None and int(v) >= 0 else None
    except (TypeError, ValueError):
        return None


def keep_aliases(model: dict[str, Any], shipped: Mapping[str, int]) -> None:
    """Aliases of `model` that point at a version not in it keep their `shipped` target
    while that is in it, else are left out: a state never moves or drops a serving alias
    that the registry did not."""
    for alias, target in list(model["aliases"].items()):
        if str(target) in model["versions"]:
            continue
        if alias in shipped and str(shipped[alias]) in model["versions"]:
            model["aliases"][alias] = shipped[alias]
        else:
            del model["aliases"][alias]


def version_entry(mv: dict[str, Any]) -> dict[str, Any]:
    """The mutable fields of a REST model version in RegistryState shape."""
    return {"description": mv.get("description") or "",
            "tags": public_tags(tags_of(mv.get("tags"))),
            "stage": mv.get("current_stage") or "None"}


def _tag_list(tags: dict[str, str] | None) -> list[dict[str, str]]:
    return [{"key": k, "value": v} for k, v in (tags or {}).items()]


class RegistryClient:
    """One registry; create it inside a running event loop, `await close()` at the end."""

    def __init__(self, tracking_uri: str, *, token: str | None = None,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                 name: str = "registry") -> None:
        self.base = tracking_uri.rstrip("/")
        self.name = name
        self.request_timeout_s = request_timeout_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S,
                                          sock_read=request_timeout_s),
        )

    async def close(self) -> None:
        await self._session.close()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"RegistryClient({self.name!r}, {self.base})"

    # -- plumbing ----------------------------------------------------------------------

    def _where(self, what: str) -> str:
        return f"mlflow registry {self.name} ({self.base}): {what}"

    async def _error(self, resp: aiohttp.ClientResponse, what: str) -> MlflowApiError:
        body = (await resp.read())[:2000].decode(errors="replace")
        code = message = None
        try:
            parsed = json.loads(body)
            code, message = parsed.get("error_code"), parsed.get("message")
        except (ValueError, AttributeError):
            pass
        retriable = resp.status >= 500 or resp.status in RETRIABLE_STATUSES
        detail = message or body.strip()[:300] or resp.reason
        return MlflowApiError(
            self._where(f"{what}: HTTP {resp.status} {code or ''} {detail}".rstrip()),
            status=resp.status, error_code=code, retriable=retriable)

    def _conn_error(self, e: BaseException, what: str) -> MlflowApiError:
        kind = "timed out" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
        return MlflowApiError(self._where(f"{what}: {kind}"), retriable=True)

    async def call(self, method: str, endpoint: str, what: str, *,
                   params: dict[str, Any] | None = None,
                   body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One JSON REST call under /api/2.0/mlflow; raises MlflowApiError."""
        url = f"{self.base}{API}/{endpoint}"
        try:
            async with self._session.request(
                method, url, params=params, json=body,
                timeout=aiohttp.ClientTimeout(total=self.request_timeout_s,
                                              sock_connect=CONNECT_TIMEOUT_S),
            ) as resp:
                if resp.status != 200:
                    raise await self._error(resp, what)
                data = await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise self._conn_error(e, what) from e
        try:
            out = json.loads(data) if data else {}
        except ValueError as e:
            raise MlflowApiError(self._where(f"{what}: answer is not JSON"),
                                 retriable=True) from e
        return out if isinstance(out, dict) else {}

    async def health(self) -> bool:
        try:
            async with self._session.get(
                f"{self.base}/health",
                timeout=aiohttp.ClientTimeout(total=min(self.request_timeout_s, 10.0)),
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    # -- registered models -------------------------------------------------------------

    async def _get(self, endpoint: str, what: str, params: dict[str, Any]
                   ) -> dict[str, Any] | None:
        """A GET's answer, None when the object it names does not exist."""
        try:
            return await self.call("GET", endpoint, what, params=params)
        except MlflowApiError as e:
            if e.not_found:
                return None
            raise

    async def get_model(self, name: str) -> dict[str, Any] | None:
        out = await self._get("registered-models/get", f"get model {name!r}", {"name": name})
        return (out or {}).get("registered_model") or None

    async def create_model(self, name: str, description: str = "",
                           tags: dict[str, str] | None = None) -> dict[str, Any]:
        out = await self.call("POST", "registered-models/create", f"create model {name!r}",
                              body={"name": name, "description": description,
                                    "tags": _tag_list(tags)})
        return out.get("registered_model", {})  # type: ignore[no-any-return]

    async def rename_model(self, name: str, new_name: str) -> None:
        await self.call("POST", "registered-models/rename",
                        f"rename model {name!r} to {new_name!r}",
                        body={"name": name, "new_name": new_name})

    async def delete_model(self, name: str) -> None:
        await self.call("DELETE", "registered-models/delete", f"delete model {name!r}",
                        body={"name": name})

    async def update_model_description(self, name: str, description: str) -> None:
        await self.call("PATCH", "registered-models/update",
                        f"update description of model {name!r}",
                        body={"name": name, "description": description})

    async def set_model_tag(self, name: str, key: str, value: str) -> None:
        await self.call("POST", "registered-models/set-tag", f"set tag {key!r} on model {name!r}",
                        body={"name": name, "key": key, "value": value})

    async def delete_model_tag(self, name: str, key: str) -> None:
        await self.call("DELETE", "registered-models/delete-tag",
                        f"delete tag {key!r} of model {name!r}", body={"name": name, "key": key})

    async def set_alias(self, name: str, alias: str, version: int) -> None:
        await self.call("POST", "registered-models/alias",
                        f"set alias {alias!r} of model {name!r} to version {version}",
                        body={"name": name, "alias": alias, "version": str(version)})

    async def delete_alias(self, name: str, alias: str) -> None:
        await self.call("DELETE", "registered-models/alias",
                        f"delete alias {alias!r} of model {name!r}",
                        body={"name": name, "alias": alias})

    async def _paged(self, endpoint: str, key: str, what: str,
                     params: dict[str, Any], page_size: int = PAGE_SIZE) -> list[dict[str, Any]]:
        """Every item of a paginated GET (`next_page_token`)."""
        out: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            page = await self.call("GET", endpoint, what, params={
                **params, "max_results": page_size, **({"page_token": token} if token else {})})
            out += page.get(key, [])
            token = page.get("next_page_token")
            if not token:
                return out

    async def search_models(self) -> list[dict[str, Any]]:
        """Every registered model (all pages), with tags and aliases."""
        return await self._paged("registered-models/search", "registered_models",
                                 "search models", {})

    # -- model versions ----------------------------------------------------------------

    async def get_version(self, name: str, version: int) -> dict[str, Any] | None:
        out = await self._get("model-versions/get", f"get version {version} of model {name!r}",
                              {"name": name, "version": str(version)})
        return (out or {}).get("model_version") or None

    async def create_version(self, name: str, source: str, run_id: str | None = None,
                             description: str = "", tags: dict[str, str] | None = None,
                             model_id: str | None = None) -> dict[str, Any]:
        """Create the next version (the server picks its number); returns it.

        MLflow 3 accepts an `mlflow-artifacts:` source only inside the artifact root of
        the run named by `run_id` (or the logged model named by `model_id`)."""
        body: dict[str, Any] = {"name": name, "source": source, "description": description,
                                "tags": _tag_list(tags)}
        if run_id:
            body["run_id"] = run_id
        if model_id:
            body["model_id"] = model_id
        out = await self.call("POST", "model-versions/create",
                              f"create a version of model {name!r}", body=body)
        return out.get("model_version", {})  # type: ignore[no-any-return]

    async def delete_version(self, name: str, version: int) -> None:
        await self.call("DELETE", "model-versions/delete",
                        f"delete version {version} of model {name!r}",
                        body={"name": name, "version": str(version)})

    async def update_version_description(self, name: str, version: int,
                                         description: str) -> None:
        await self.call("PATCH", "model-versions/update",
                        f"update description of version {version} of model {name!r}",
                        body={"name": name, "version": str(version),
                              "description": description})

    async def transition_stage(self, name: str, version: int, stage: str,
                               archive_existing: bool = False) -> None:
        await self.call("POST", "model-versions/transition-stage",
                        f"move version {version} of model {name!r} to stage {stage!r}",
                        body={"name": name, "version": str(version), "stage": stage,
                              "archive_existing_versions": archive_existing})

    async def set_version_tag(self, name: str, version: int, key: str, value: str) -> None:
        await self.call("POST", "model-versions/set-tag",
                        f"set tag {key!r} on version {version} of model {name!r}",
                        body={"name": name, "version": str(version), "key": key,
                              "value": value})

    async def delete_version_tag(self, name: str, version: int, key: str) -> None:
        await self.call("DELETE", "model-versions/delete-tag",
                        f"delete tag {key!r} of version {version} of model {name!r}",
                        body={"name": name, "version": str(version), "key": key})

    async def search_versions(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every model version (of `name`, or of every model), all pages, with tags."""
        if name is None:
            return await self._paged("model-versions/search", "model_versions",
                                     "search versions", {})
        found = await self._paged("model-versions/search", "model_versions",
                                  f"search versions of model {name!r}",
                                  {"filter": name_filter(name)})
        return [v for v in found if v.get("name") == name]

    async def get_download_uri(self, name: str, version: int) -> str:
        out = await self.call("GET", "model-versions/get-download-uri",
                              f"artifact location of version {version} of model {name!r}",
                              params={"name": name, "version": str(version)})
        return str(out.get("artifact_uri", ""))

    # -- experiments and runs (a home for artifacts on a standby) ----------------------

    async def get_experiment(self, name: str) -> dict[str, Any] | None:
        """Experiment `name` (deleted ones too: see `lifecycle_stage`), or None."""
        out = await self._get("experiments/get-by-name", f"get experiment {name!r}",
                              {"experiment_name": name})
        return None if out is None else out["experiment"]

    async def experiment_id(self, name: str, artifact_location: str | None = None,
                            tags: dict[str, str] | None = None) -> str:
        """The id of experiment `name`, created (with `artifact_location` and `tags`) if
        missing."""
        exp = await self.get_experiment(name)
        if exp is not None:
            return str(exp["experiment_id"])
        body: dict[str, Any] = {"name": name, "tags": _tag_list(tags)}
        if artifact_location:
            body["artifact_location"] = artifact_location
        try:
            out = await self.call("POST", "experiments/create", f"create experiment {name!r}",
                                  body=body)
            return str(out["experiment_id"])
        except MlflowApiError as e:
            if not e.already_exists:
                raise
            return await self.experiment_id(name)

    async def create_run(self, experiment_id: str, run_name: str | None = None,
                         tags: dict[str, str] | None = None,
                         start_time_ms: int | None = None) -> dict[str, Any]:
        """A new run; returns its `info` (run_id, artifact_uri, ...)."""
        body: dict[str, Any] = {"experiment_id": experiment_id, "tags": _tag_list(tags)}
        if run_name:
            body["run_name"] = run_name
        if start_time_ms is not None:
            body["start_time"] = start_time_ms
        out = await self.call("POST", "runs/create", f"create run {run_name or ''} in "
                              f"experiment {experiment_id}".replace("  ", " "), body=body)
        return out.get("run", {}).get("info", {})  # type: ignore[no-any-return]

    async def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        await self.call("POST", "runs/update", f"end run {run_id}",
                        body={"run_id": run_id, "status": status})

    @staticmethod
    def artifact_path_of(uri: str) -> str | None:
        """`mlflow-artifacts:/a/b` (or the http form) -> `a/b`; None for other schemes."""
        parsed = urlparse(uri)
        if parsed.scheme == "mlflow-artifacts":
            return parsed.path.strip("/")
        if parsed.scheme in ("http", "https") and ARTIFACTS_API in parsed.path:
            return parsed.path.split(ARTIFACTS_API, 1)[1].strip("/")
        return None

    # -- artifacts ---------------------------------------------------------------------

    async def artifact_root(self, name: str, version: int) -> str:
        """The version's artifact directory as an `mlflow-artifacts` path (no scheme),
        from its download URI (looked up by the model's current name)."""
        uri = await self.get_download_uri(name, version)
        return await self._resolve_root(uri, f"version {version} of model {name!r}")

    async def _resolve_root(self, uri: str, what: str) -> str:
        for _ in range(4):  # runs:/ -> mlflow-artifacts:/, models:/ -> mlflow-artifacts:/
            parsed = urlparse(uri)
            path = self.artifact_path_of(uri)
            if path is not None:
                return path
            if parsed.scheme == "runs":
                run_id, _, rel = uri[len("runs:/"):].lstrip("/").partition("/")
                run = await self.call("GET", "runs/get", f"run {run_id} of {what}",
                                      params={"run_id": run_id})
                base = run.get("run", {}).get("info", {}).get("artifact_uri", "")
                uri = f"{base.rstrip('/')}/{rel}" if rel else base
                continue
            if parsed.scheme == "models":
                model_id = uri[len("models:/"):].strip("/").split("/", 1)[0]
                lm = await self.call("GET", f"logged-models/{quote(model_id, safe='')}",
                                     f"logged model {model_id} of {what}")
                uri = lm.get("model", {}).get("info", {}).get("artifact_location", "")
                continue
            break
        raise MlflowApiError(self._where(
            f"{what}: artifact location {uri!r} is not served by the tracking server "
            "(start it with --serve-artifacts); cannot read its files"), retriable=False)

    def _artifact_url(self, path: str) -> str:
        return f"{self.base}{ARTIFACTS_API}/{quote(path.strip('/'), safe='/')}"

    async def _list_dir(self, path: str) -> list[dict[str, Any]]:
        try:
            async with self._session.get(
                f"{self.base}{ARTIFACTS_API}", params={"path": path},
                timeout=aiohttp.ClientTimeout(total=self.request_timeout_s,
                                              sock_connect=CONNECT_TIMEOUT_S),
            ) as resp:
                if resp.status != 200:
                    raise await self._error(resp, f"list artifacts under {path!r}")
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise self._conn_error(e, f"list artifacts under {path!r}") from e
        return list((data or {}).get("files", []))

    async def list_artifacts(self, root: str) -> list[ArtifactFile]:
        """Every file below `root` (recursively), sorted by relative path. A root that is a
        single file lists as that file (by its base name)."""
        out: list[ArtifactFile] = []
        todo = [""]
        while todo:
            rel = todo.pop()
            for entry in await self._list_dir(f"{root}/{rel}".rstrip("/") if rel else root):
                child = f"{rel}/{entry['path'].rsplit('/', 1)[-1]}".lstrip("/")
                if entry.get("is_dir"):
                    todo.append(child)
                else:
                    # proto3 JSON leaves out a zero file_size
                    out.append(ArtifactFile(child, int(entry.get("file_size") or 0)))
        if not out and root:
            size = await self._file_size(root)
            if size is not None:
                out.append(ArtifactFile(root.rsplit("/", 1)[-1], size))
        return sorted(out, key=lambda f: f.path)

    async def _file_size(self, path: str) -> int | None:
        try:
            async with self._session.head(self._artifact_url(path)) as resp:
                if resp.status != 200:
                    return None
                return int(resp.headers.get("Content-Length", "0"))
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise self._conn_error(e, f"stat artifact {path!r}") from e

    async def download(self, path: str,
                       chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> AsyncIterator[bytes]:
        """The file's bytes as chunks of exactly `chunk_bytes` (the last one shorter);
        holds one chunk in memory at a time."""
        what = f"download artifact {path!r}"
        try:
            async with self._session.get(self._artifact_url(path)) as resp:
                if resp.status != 200:
                    err = await self._error(resp, what)
                    if resp.status == 404:  # listed a moment ago: changing, list again
                        err.retriable = True
                    raise err
                buf = bytearray()
                async for piece in resp.content.iter_chunked(min(chunk_bytes, 1 << 20)):
                    buf += piece
                    while len(buf) >= chunk_bytes:
                        yield bytes(buf[:chunk_bytes])
                        del buf[:chunk_bytes]
                if buf:
                    yield bytes(buf)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise self._conn_error(e, what) from e

    async def upload(self, path: str, chunks: AsyncIterable[bytes],
                     size: int | None = None) -> None:
        """Stream a file to the artifact store at `path` (one PUT; with `size` it is sent
        with a Content-Length, otherwise chunked)."""
        what = f"upload artifact {path!r}"
        headers = {"Content-Type": "application/octet-stream"}
        if size is not None:
            headers["Content-Length"] = str(size)

        async def body() -> AsyncIterator[bytes]:
            async for c in chunks:
                yield c

        try:
            async with self._session.put(self._artifact_url(path), data=body(),
                                         headers=headers) as resp:
                if resp.status != 200:
                    raise await self._error(resp, what)
                await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise self._conn_error(e, what) from e

    # -- webhooks ----------------------------------------------------------------------

    async def list_webhooks(self) -> list[dict[str, Any]]:
        return await self._paged("webhooks", "webhooks", "list webhooks", {}, page_size=100)

    async def ensure_webhook(self, name: str, url: str, secret: str,
                             events: tuple[tuple[str, str], ...] = ALL_WEBHOOK_EVENTS,
                             ) -> str:
        """Create the webhook `name`, or update the one that exists (url, events, secret,
        ACTIVE); returns its id. Idempotent."""
        body = {"name": name, "url": url, "secret": secret, "status": "ACTIVE",
                "events": [{"entity": e, "action": a} for e, a in events]}
        for hook in await self.list_webhooks():
            if hook.get("name") == name:
                hook_id = str(hook["webhook_id"])
                await self.call("PATCH", f"webhooks/{quote(hook_id, safe='')}",
                                f"update webhook {name!r}", body=body)
                return hook_id
        out = await self.call("POST", "webhooks", f"create webhook {name!r}", body=body)
        return str(out.get("webhook", {}).get("webhook_id", ""))

    async def delete_webhook(self, name: str) -> bool:
        for hook in await self.list_webhooks():
            if hook.get("name") == name:
                await self.call("DELETE", f"webhooks/{quote(str(hook['webhook_id']), safe='')}",
                                f"delete webhook {name!r}")
                return True
        return False

    # -- registry state ----------------------------------------------------------------

    async def snapshot(self, known: dict[str, Any] | None = None,
                       selection: ModelSelection | None = None) -> Snapshot:
        """The live registry in RegistryState shape, without drstream's own models and
        tags. Only READY versions are included; an alias pointing elsewhere keeps its
        `known` target if it can, else is left out. A version whose (source, run_id) is
        in `known` (under any model name: renames) reuses its artifact list; the others
        get [] and are listed in `missing`.

        The models are listed before and after the versions: a model renamed, created
        again or changed meanwhile, a version listed under a model the listing does not
        have, or a model or version that `known` has and the listings lack but the
        registry still serves (a page that shifted) makes the snapshot disagree with
        itself; it is taken again, and the models that keep disagreeing are left as in
        `known` (`narrowed`), so nothing is ever reported deleted that was not."""
        known = known or {"models": {}}
        for attempt in range(SNAPSHOT_ATTEMPTS):
            if attempt:
                await asyncio.sleep(SNAPSHOT_RETRY_S)
            snap, moved = await self._snapshot_once(known, selection)
            if not moved:
                return snap
        return _narrow(snap, known, moved)

    def _selected(self, name: str, selection: ModelSelection | None) -> bool:
        return not is_internal_model(name) and (selection is None or selection.matches(name))

    async def _snapshot_once(self, known: dict[str, Any], selection: ModelSelection | None
                             ) -> tuple[Snapshot, set[str]]:
        """One snapshot and the names of the models its listings disagree about."""
        reuse: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
        for m in known["models"].values():
            for v in m["versions"].values():
                reuse[(v["source"], v["run_id"])] = v["artifacts"]
        before = {rm["name"]: rm for rm in await self.search_models()}
        models = {name: model_entry(rm) for name, rm in before.items()
                  if self._selected(name, selection)}
        snap = Snapshot(state={"models": models})
        moved: set[str] = set()
        for mv in await self.search_versions():
            name = mv["name"]
            if name not in before:  # its model came (or was renamed) after the listing
                moved |= {name} if self._selected(name, selection) else set()
                continue
            if name not in models or mv.get("status", READY) != READY:
                continue
            n = int(mv["version"])
            source = mv.get("source") or ""
            run_id = mv.get("run_id") or None
            artifacts = reuse.get((source, run_id))
            if artifacts is None:
                snap.missing.append((name, n))
                artifacts = []
            models[name]["versions"][str(n)] = {
                **version_entry(mv), "run_id": run_id, "source": source,
                "artifacts": [dict(a, chunks=list(a["chunks"])) for a in artifacts],
            }
        for name, m in models.items():
            km = known["models"].get(name)
            same = km is not None and km.get("created_ms") in (None, m.get("created_ms"))
            keep_aliases(m, km["aliases"] if same else {})
        snap.missing.sort()
        moved |= await self._still_served(known, models, selection)
        after = {rm["name"]: rm for rm in await self.search_models()}
        moved |= {name for name in set(before) | set(after)
                  if self._selected(name, selection) and _stamp(before.get(name)) !=
                  _stamp(after.get(name))}
        return snap, moved

    async def _still_served(self, known: dict[str, Any], models: dict[str, Any],
                            selection: ModelSelection | None) -> set[str]:
        """Names of models the listings lack, or lack a version of, that `known` has and
        the registry still serves: the listings missed them."""
        out: set[str] = set()
        for name, km in known["models"].items():
            if not self._selected(name, selection):
                continue
            live = _counterpart(km, name, models)
            if live is None:  # gone by name and identity: deleted, if the registry agrees
                rm = await self.get_model(name)
                if rm is not None and km.get("created_ms") in (
                        None, _int_or_none(rm.get("creation_timestamp"))):
                    out.add(name)
                continue
            lname, lm = live
            for n in sorted(set(km["versions"]) - set(lm["versions"]), key=int):
                mv = await self.get_version(lname, int(n))
                if mv is not None and mv.get("status", READY) == READY:
                    out.add(lname)
                    break
        return out

    async def version_root(self, name: str, version: int, source: str) -> str:
        """The version's artifact directory from its own `source` (a run's or a logged
        model's files, an artifact URI), never from the model's current name: a model
        renamed or created again meanwhile cannot hand over another version's files. A
        source naming a registered model (`models:/<name>/...`) is resolved by the
        registry (the version's download URI)."""
        parsed = urlparse(source)
        by_model = parsed.scheme == "models" and not re.fullmatch(
            r"m-[^/@]+", source[len("models:/"):].strip("/"))
        if by_model or not source:
            return await self.artifact_root(name, version)
        return await self._resolve_root(source, f"version {version} of model {name!r}")


def _stamp(rm: dict[str, Any] | None) -> tuple[Any, Any] | None:
    """What changes when a registered model is renamed away, created again or changed
    (MLflow moves `last_updated_timestamp` on renames, version creations and deletions,
    stage and description updates)."""
    return None if rm is None else (rm.get("creation_timestamp"),
                                     rm.get("last_updated_timestamp"))


def _counterpart(km: dict[str, Any], name: str, models: dict[str, Any]
                 ) -> tuple[str, dict[str, Any]] | None:
    """The live model (name, entry) that known model `name` is: the one with its
    identity, or without identities the one with its name."""
    ident = km.get("created_ms")
    live = models.get(name)
    if live is not None and ident in (None, live.get("created_ms")):
        return name, live
    if ident is not None:
        for lname, lm in models.items():
            if lm.get("created_ms") == ident:
                return lname, lm
    return None


def _narrow(snap: Snapshot, known: dict[str, Any], moved: set[str]) -> Snapshot:
    """Leave the models that kept moving, under every name they had, as in `known`."""
    models, old = snap.state["models"], known["models"]
    ids = {m.get("created_ms") for n in moved for m in (models.get(n), old.get(n)) if m}
    ids.discard(None)
    names = moved | {n for n, m in [*models.items(), *old.items()] if m.get("created_ms") in ids}
    for n in names:
        models.pop(n, None)
        if n in old:
            models[n] = copy.deepcopy(old[n])
    snap.missing = [(n, v) for n, v in snap.missing if n not in names]
    snap.narrowed = sorted(names)
    return snap


async def sha256_of(chunks: AsyncIterable[bytes]) -> tuple[str, int]:
    """Hash and size of a chunk stream (verification helper)."""
    h = hashlib.sha256()
    n = 0
    async for c in chunks:
        h.update(c)
        n += len(c)
    return h.hexdigest(), n
