"""Read-side helpers for registry drills: compare a scratch registry with the state the
log's events fold into (artifact files by sha256 and size, streamed), and clean up.

Only the models of one stream are looked at: those the expected state names and those
tagged `drstream.source = <stream>/...` (what a replay of that stream made). drstream's
own tags and checkpoint models are left out of every comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from drstream.connectors.mlflow.client import (
    MlflowApiError,
    RegistryClient,
    model_entry,
    sha256_of,
    tags_of,
    version_entry,
)
from drstream.connectors.mlflow.events import SOURCE_TAG, is_internal_model, public_tags
from drstream.daemon.errors import SinkError

DOWNLOAD_CHUNK_BYTES = 1 << 20  # memory per file being checked
MODEL_FIELDS = ("description", "tags", "aliases")
VERSION_FIELDS = ("description", "tags", "stage")


@dataclass
class RegistryCheck:
    """What a drill compared and what differed (one entry per model/version/field)."""

    mismatches: list[dict[str, Any]] = field(default_factory=list)
    models: int = 0
    versions: int = 0
    files: int = 0
    file_bytes: int = 0

    def add(self, model: str, version: int | None, fld: str, log: Any, target: Any) -> None:
        self.mismatches.append({"model": model, "version": version, "field": fld,
                                "log": log, "target": target})


def _ours(tags: dict[str, str], stream: str) -> bool:
    return tags.get(SOURCE_TAG, "").startswith(f"{stream}/")


async def replicated_models(client: RegistryClient, stream: str) -> list[str]:
    """Names of the models on the registry that a replay of `stream` made."""
    try:
        models = await client.search_models()
    except MlflowApiError as e:
        raise SinkError(f"drill: cannot list the models of {client!r}: {e}",
                        retriable=e.retriable) from e
    return sorted(m["name"] for m in models
                  if not is_internal_model(m["name"]) and _ours(tags_of(m.get("tags")), stream))


async def read_replica(client: RegistryClient, stream: str,
                       names: set[str]) -> dict[str, Any]:
    """The registry's models named in `names` or made from `stream`, in RegistryState
    shape without artifacts (versions: description, public tags, stage)."""
    models: dict[str, Any] = {}
    for rm in await client.search_models():
        name = rm["name"]
        if is_internal_model(name) or not (name in names
                                           or _ours(tags_of(rm.get("tags")), stream)):
            continue
        models[name] = model_entry(rm)
    for mv in await client.search_versions():
        if mv["name"] in models:
            models[mv["name"]]["versions"][str(int(mv["version"]))] = version_entry(mv)
    return {"models": models}


async def compare_registry(client: RegistryClient, stream: str,
                           expected: dict[str, Any]) -> RegistryCheck:
    """Compare the registry with `expected` (a folded RegistryState): names, version
    numbers, descriptions, public tags, aliases, stages, and every artifact file's
    sha256 and size (downloaded in chunks, never held whole)."""
    check = RegistryCheck()
    try:
        actual = await read_replica(client, stream, set(expected["models"]))
        for name in sorted(set(expected["models"]) | set(actual["models"])):
            want, have = expected["models"].get(name), actual["models"].get(name)
            if want is None or have is None:
                check.add(name, None, "model", "present" if want else "absent",
                          "present" if have else "absent")
                continue
            check.models += 1
            for f in MODEL_FIELDS:
                w = public_tags(want[f]) if f == "tags" else want[f]
                if w != have[f]:
                    check.add(name, None, f, w, have[f])
            wv, hv = want["versions"], have["versions"]
            if sorted(wv, key=int) != sorted(hv, key=int):
                check.add(name, None, "versions", sorted(map(int, wv)), sorted(map(int, hv)))
            for n in sorted(set(wv) & set(hv), key=int):
                check.versions += 1
                for f in VERSION_FIELDS:
                    w = public_tags(wv[n][f]) if f == "tags" else wv[n][f]
                    if w != hv[n][f]:
                        check.add(name, int(n), f, w, hv[n][f])
                await _compare_files(client, check, name, int(n), wv[n]["artifacts"])
    except MlflowApiError as e:
        raise SinkError(f"drill: cannot read the scratch registry {client!r}: {e}",
                        retriable=e.retriable) from e
    return check


async def _compare_files(client: RegistryClient, check: RegistryCheck, name: str, n: int,
                         artifacts: list[dict[str, Any]]) -> None:
    root = await client.artifact_root(name, n)
    have = {f.path: f.size for f in await client.list_artifacts(root)} if root else {}
    want = {a["path"]: a for a in artifacts}
    for path in sorted(set(want) | set(have)):
        a = want.get(path)
        if a is None or path not in have:
            check.add(name, n, f"file {path}", "present" if a else "absent",
                      "present" if path in have else "absent")
            continue
        check.files += 1
        if have[path] != a["size"]:
            check.add(name, n, f"file {path}", {"size": a["size"], "sha256": a["sha256"]},
                      {"size": have[path]})
            continue
        digest, size = await sha256_of(client.download(f"{root}/{path}".lstrip("/"),
                                                       DOWNLOAD_CHUNK_BYTES))
        check.file_bytes += size
        if (digest, size) != (a["sha256"], a["size"]):
            check.add(name, n, f"file {path}", {"size": a["size"], "sha256": a["sha256"]},
                      {"size": size, "sha256": digest})


async def delete_replica(client: RegistryClient, stream: str, checkpoint_model: str,
                         experiment: str) -> list[str]:
    """Remove what a scratch replay of `stream` made: its models, its checkpoint model and
    its experiment (MLflow only marks experiments deleted; the artifact files stay until
    `mlflow gc`). Returns the models deleted."""
    names = await replicated_models(client, stream)
    try:
        for name in [*names, checkpoint_model]:
            try:
                await client.delete_model(name)
            except MlflowApiError as e:
                if not e.not_found:
                    raise
        exp = await client.get_experiment(experiment)
        if exp is not None:
            await client.call("POST", "experiments/delete", f"delete experiment {experiment!r}",
                              body={"experiment_id": exp["experiment_id"]})
    except MlflowApiError as e:
        raise SinkError(f"drill: cannot clean up the scratch registry {client!r}: {e}",
                        retriable=e.retriable) from e
    return names
