"""The MLflow sink's artifacts: a version's files, from the log's blobs to the standby.

The standby's server must serve artifacts (`--serve-artifacts`). Files are streamed chunk
by chunk from the log's blobs (sha256 and size of each whole file verified before its last
byte is sent) into the artifact directory of one run per log and sink, in the experiment
`drstream.<log_id>.<sink name>` whose artifact location is
`mlflow-artifacts:/<artifact_prefix>/<log_id>`; a version's files land under
`<run artifacts>/versions/<key>/` and the version points at that directory (MLflow only
accepts an `mlflow-artifacts:` source inside the artifact directory of the version's run).
The key is a digest of what the version is (model name and number when it was created,
run, source and every file's path, size and sha256), not of its name and number alone: a
model renamed, or deleted and created again, never shares a directory with another
version of other files. A file found there already (uploaded before a crash) is kept
only when its sha256 is the one the event names.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from drstream.connectors.mlflow.client import MlflowApiError, RegistryClient, sha256_of
from drstream.connectors.mlflow.events import Event
from drstream.daemon.errors import DrstreamError, SinkError
from drstream.daemon.logging import get_logger

if TYPE_CHECKING:
    from drstream.daemon.blobs import BlobStore

log = get_logger("drstream.mlflow.sink")

RUN_NAME = "drstream-replica"
LOG_ID_TAG = "drstream.log_id"
PREFETCH_CHUNKS = 1  # blobs fetched ahead of the upload: memory <= (1 + this) chunks
VERIFY_CHUNK_BYTES = 1 << 20  # memory per file checked on the standby


def version_key(ev: Event) -> str:
    """The directory name of a version's files on the standby (see the module doc)."""
    what = [ev["name"], ev["version"], ev["run_id"], ev["source"],
            [[a["path"], a["size"], a["sha256"]] for a in ev["artifacts"]]]
    return hashlib.sha256(json.dumps(what, separators=(",", ":")).encode()).hexdigest()[:32]


class VersionSource(NamedTuple):
    """What a standby version is created with once its files are there."""

    run_id: str
    source: str  # mlflow-artifacts:/<run artifacts>/versions/<key>


class ReplicaArtifacts:
    """Puts versions' files into the replica run of one log and sink on the standby.

    `client` hands out the sink's registry client (the sink opens it on first use and
    closes it); `sink` and `where` name the sink in logs and errors."""

    def __init__(self, client: Callable[[], RegistryClient], blobs: BlobStore | None, *,
                 sink: str, where: str, log_id: str, experiment: str,
                 artifact_prefix: str) -> None:
        self._client = client
        self.blobs = blobs
        self.name = sink
        self.where = where
        self.log_id = log_id
        self.experiment_name = experiment
        self.artifact_prefix = artifact_prefix
        self._run: tuple[str, str] | None = None  # (run id, artifact root path)

    async def upload(self, ev: Event) -> VersionSource:
        """Upload the version's files; the run id and source URI to create it with."""
        run_id, root = await self._replica_run()
        vdir = f"{root}/versions/{version_key(ev)}"
        have = {f.path: f.size for f in await self._client().list_artifacts(vdir)} \
            if ev["artifacts"] else {}
        for a in ev["artifacts"]:
            if have.get(a["path"]) == a["size"] and \
                    await self._present(f"{vdir}/{a['path']}", a["sha256"]):
                # uploaded before a restart
                log.info("artifact_present", sink=self.name, model=ev["name"],
                         version=ev["version"], path=a["path"], size=a["size"])
                continue
            started = time.monotonic()
            failed: list[BaseException] = []
            try:
                await self._client().upload(f"{vdir}/{a['path']}",
                                            self._file_chunks(ev, a, failed), size=a["size"])
            except MlflowApiError as e:
                if failed:  # the HTTP library wraps what the body generator raised
                    raise failed[0] from e
                raise
            log.info("artifact_uploaded", sink=self.name, model=ev["name"],
                     version=ev["version"], path=a["path"], size=a["size"],
                     seconds=round(time.monotonic() - started, 3))
        return VersionSource(run_id, f"mlflow-artifacts:/{vdir}")

    async def _replica_run(self) -> tuple[str, str]:
        """(run id, artifact root path) of the run that holds this sink's artifacts."""
        if self._run is not None:
            return self._run
        c = self._client()
        location = f"mlflow-artifacts:/{self.artifact_prefix.strip('/')}/{self.log_id}"
        exp = await c.get_experiment(self.experiment_name)
        if exp is None:
            exp_id = await c.experiment_id(self.experiment_name, location,
                                           {LOG_ID_TAG: self.log_id})
        else:
            exp_id = str(exp["experiment_id"])
            if exp.get("lifecycle_stage") == "deleted":
                await c.call("POST", "experiments/restore",
                             f"restore experiment {self.experiment_name!r}",
                             body={"experiment_id": exp_id})
        runs = (await c.call("POST", "runs/search", f"runs of {self.experiment_name!r}",
                             body={"experiment_ids": [exp_id], "max_results": 1,
                                   "filter": f"tags.`{LOG_ID_TAG}` = '{self.log_id}'",
                                   "run_view_type": "ALL",
                                   "order_by": ["attributes.start_time ASC"]})).get("runs", [])
        info = runs[0]["info"] if runs else await c.create_run(
            exp_id, RUN_NAME, {LOG_ID_TAG: self.log_id}, start_time_ms=int(time.time() * 1000))
        uri = str(info["artifact_uri"])
        if not uri.startswith("mlflow-artifacts:/"):
            raise SinkError(f"{self.where}: run {info['run_id']} stores artifacts at {uri!r}; "
                            "the standby server must serve artifacts (--serve-artifacts)")
        self._run = (str(info["run_id"]), uri[len("mlflow-artifacts:"):].strip("/"))
        return self._run

    async def _present(self, path: str, sha256: str) -> bool:
        """Whether the standby's file at `path` has this sha256 (read in 1 MiB chunks)."""
        digest, _ = await sha256_of(self._client().download(path, VERIFY_CHUNK_BYTES))
        return digest == sha256

    async def _file_chunks(self, ev: Event, a: dict[str, Any],
                           failed: list[BaseException]) -> AsyncIterator[bytes]:
        """The file's bytes from the log's blobs. The whole file's sha256 and size are
        checked before its last chunk is handed out, so a wrong file is never completed.
        What goes wrong is also put in `failed` (the upload may wrap it)."""
        try:
            async for data in self._verified_chunks(ev, a):
                yield data
        except (DrstreamError, OSError) as e:
            failed.append(e)
            raise

    async def _verified_chunks(self, ev: Event, a: dict[str, Any]) -> AsyncIterator[bytes]:
        if self.blobs is None:
            raise SinkError(f"{self.name}: no blob store to read artifacts from")
        where = f"model {ev['name']!r} version {ev['version']} file {a['path']!r}"
        h = hashlib.sha256()
        size = 0
        chunks: list[str] = a["chunks"]
        pending: list[asyncio.Task[bytes]] = []
        try:
            for i in range(len(chunks)):
                while len(pending) <= PREFETCH_CHUNKS and i + len(pending) < len(chunks):
                    pending.append(asyncio.ensure_future(
                        self.blobs.get(chunks[i + len(pending)])))
                data = await pending.pop(0)
                h.update(data)
                size += len(data)
                if size > a["size"]:
                    raise SinkError(f"{self.name}: {where}: chunks hold more than the "
                                    f"{a['size']} bytes the event names")
                if i == len(chunks) - 1 and (size != a["size"] or h.hexdigest() != a["sha256"]):
                    raise SinkError(f"{self.name}: {where}: chunks give {size} bytes with "
                                    f"sha256 {h.hexdigest()}, the event names {a['size']} "
                                    f"bytes with sha256 {a['sha256']}")
                yield data
            if not chunks and (a["size"] != 0 or h.hexdigest() != a["sha256"]):
                raise SinkError(f"{self.name}: {where}: no chunks but size {a['size']} / "
                                f"sha256 {a['sha256']}")
        finally:
            for t in pending:
                t.cancel()
                t.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Task[bytes]) -> None:
    """Mark a prefetch that is no longer wanted as seen (no 'never retrieved' noise)."""
    if not task.cancelled():
        task.exception()
