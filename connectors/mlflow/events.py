"""Registry state and the typed events that turn one state into the next.

The `mlflow` source snapshots the primary registry into a `RegistryState` (a JSON-native
dict, shape below), diffs it against the last state it shipped and writes the events
into the log; the `mlflow` sink replays them on the standby. Both sides rely on

    fold(old, diff(old, new)) == new

State (canonical JSON = sorted keys, compact separators, ASCII):

    {"models": {name: {"description": str, "tags": {k: v}, "aliases": {alias: version},
       "versions": {"<n>": {"description": str, "tags": {k: v}, "stage": str,
          "run_id": str | null, "source": str,
          "artifacts": [{"path": str, "size": int, "sha256": hex, "chunks": [hex]}]}}}}}

Tags whose key starts with `drstream.` are drstream's own bookkeeping on a standby and
are never diffed; nor are the sink's checkpoint models (`drstream.checkpoint.*`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from daemon.errors import DrstreamError

if TYPE_CHECKING:
    from daemon.blobs import BlobStore

State = dict[str, Any]
Event = dict[str, Any]

INTERNAL_TAG_PREFIX = "drstream."
CHECKPOINT_MODEL_PREFIX = "drstream.checkpoint."
SOURCE_TAG = "drstream.source"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class EventError(DrstreamError):
    """A registry event or state that does not have the documented shape, or an event
    that does not apply to the state it is folded into. Never retriable."""


# -- field checks ------------------------------------------------------------------------

def _str(v: Any) -> bool:
    return isinstance(v, str)


def _name(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def _int_version(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _tags(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(k, str) and k != "" and isinstance(x, str) for k, x in v.items())


def check_artifact_path(path: Any) -> str | None:
    """Why `path` is not a safe relative POSIX path (None if it is)."""
    if not isinstance(path, str) or path == "":
        return "must be a non-empty string"
    if path.startswith("/") or "\\" in path or "\x00" in path:
        return "must be a relative POSIX path"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "must not have empty, '.' or '..' segments"
    return None


def _artifacts_error(v: Any) -> str | None:
    if not isinstance(v, list):
        return "must be a list"
    seen: set[str] = set()
    for i, a in enumerate(v):
        where = f"[{i}]"
        if not isinstance(a, dict):
            return f"{where} must be an object"
        extra = set(a) - {"path", "size", "sha256", "chunks"}
        if extra:
            return f"{where} has unknown field(s) {sorted(extra)}"
        why = check_artifact_path(a.get("path"))
        if why:
            return f"{where}.path {why}"
        if a["path"] in seen:
            return f"{where}.path {a['path']!r} appears twice"
        seen.add(a["path"])
        size = a.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return f"{where}.size must be an integer >= 0"
        if not isinstance(a.get("sha256"), str) or not _HEX64.match(a["sha256"]):
            return f"{where}.sha256 must be 64 lowercase hex digits"
        chunks = a.get("chunks")
        if not isinstance(chunks, list) or not all(
                isinstance(c, str) and _HEX64.match(c) for c in chunks):
            return f"{where}.chunks must be a list of blob ids (64 lowercase hex digits)"
        if size > 0 and not chunks:
            return f"{where}.chunks is empty for a file of {size} bytes"
    return None


_CHECKS: dict[str, tuple[Any, str]] = {
    "name": (_name, "a non-empty string"),
    "new_name": (_name, "a non-empty string"),
    "description": (_str, "a string"),
    "tags": (_tags, "an object of string -> string (non-empty keys)"),
    "key": (_name, "a non-empty string"),
    "value": (_str, "a string"),
    "version": (_int_version, "an integer >= 1"),
    "stage": (_str, "a string"),
    "run_id": (_opt_str, "a string or null"),
    "source": (_str, "a string"),
    "alias": (_name, "a non-empty string"),
}

EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "model.created": ("name", "description", "tags"),
    "model.renamed": ("name", "new_name"),
    "model.description": ("name", "description"),
    "model.deleted": ("name",),
    "model.tag.set": ("name", "key", "value"),
    "model.tag.deleted": ("name", "key"),
    "version.created": ("name", "version", "description", "tags", "stage", "run_id",
                        "source", "artifacts"),
    "version.description": ("name", "version", "description"),
    "version.stage": ("name", "version", "stage"),
    "version.tag.set": ("name", "version", "key", "value"),
    "version.tag.deleted": ("name", "version", "key"),
    "version.deleted": ("name", "version"),
    "alias.set": ("name", "alias", "version"),
    "alias.deleted": ("name", "alias"),
}


def validate_event(ev: Any) -> Event:
    """Return `ev` if it is a well-formed event; raise EventError naming the bad field."""
    if not isinstance(ev, dict):
        raise EventError(f"registry event must be an object, got {type(ev).__name__}")
    etype = ev.get("type")
    if etype not in EVENT_FIELDS:
        raise EventError(f"registry event: field 'type' must be one of "
                         f"{sorted(EVENT_FIELDS)} (got {etype!r})")
    fields = EVENT_FIELDS[etype]
    what = f"registry event {etype}"
    if isinstance(ev.get("name"), str):
        what += f" (model {ev['name']!r})"
    for f in fields:
        if f not in ev:
            raise EventError(f"{what}: field {f!r} is missing")
        if f == "artifacts":
            why = _artifacts_error(ev[f])
            if why:
                sub, _, reason = why.partition(" ") if why[0] == "[" else ("", "", why)
                raise EventError(f"{what}: field 'artifacts{sub}' {reason}")
            continue
        ok, expected = _CHECKS[f]
        if not ok(ev[f]):
            raise EventError(f"{what}: field {f!r} must be {expected} (got {ev[f]!r:.80})")
    extra = set(ev) - set(fields) - {"type"}
    if extra:
        raise EventError(f"{what}: unknown field(s) {sorted(extra)}")
    return ev


# -- state: canonical JSON, digest, validation -------------------------------------------

def empty_state() -> State:
    return {"models": {}}


def dump_state(state: State) -> bytes:
    """The canonical JSON bytes of `state` (what is stored as the source's state blob)."""
    return json.dumps(state, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def load_state(raw: bytes | str) -> State:
    """Parse and validate a state written by dump_state."""
    try:
        state = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise EventError(f"registry state is not valid JSON: {e}") from e
    validate_state(state)
    return state  # type: ignore[no-any-return]


async def read_state_blob(blobs: BlobStore, positions: Mapping[str, Any]
                          ) -> tuple[str, State] | None:
    """The state blob a log position names, as (blob id, state); None when it names
    none. The blob store checks the content against its SHA-256 id (BlobError); a blob
    that is not a valid state raises EventError."""
    bid = positions.get("state_blob")
    if not bid:
        return None
    return str(bid), load_state(await blobs.get(str(bid)))


def state_digest(state: State) -> str:
    """SHA-256 hex of the canonical JSON of `state`."""
    return hashlib.sha256(dump_state(state)).hexdigest()


def validate_state(state: Any) -> State:
    if not isinstance(state, dict) or set(state) != {"models"} or \
            not isinstance(state["models"], dict):
        raise EventError("registry state must be an object with exactly one field 'models'")
    for name, m in state["models"].items():
        where = f"registry state: model {name!r}"
        if not _name(name):
            raise EventError("registry state: model names must be non-empty strings")
        if not isinstance(m, dict) or set(m) != {"description", "tags", "aliases", "versions"}:
            raise EventError(f"{where} must have exactly description, tags, aliases, versions")
        for f in ("description", "tags"):
            if not _CHECKS[f][0](m[f]):
                raise EventError(f"{where}: field {f!r} must be {_CHECKS[f][1]}")
        if not isinstance(m["versions"], dict):
            raise EventError(f"{where}: field 'versions' must be an object")
        for n, v in m["versions"].items():
            vwhere = f"{where} version {n!r}"
            if not (isinstance(n, str) and n.isdigit() and str(int(n)) == n and int(n) >= 1):
                raise EventError(f"{vwhere}: version keys must be decimal integers >= 1")
            if not isinstance(v, dict) or set(v) != set(_VERSION_FIELDS):
                raise EventError(f"{vwhere} must have exactly {sorted(_VERSION_FIELDS)}")
            try:
                validate_event({"type": "version.created", "name": name, "version": int(n),
                                **v})
            except EventError as e:
                raise EventError(f"{vwhere}: {e}") from None
        aliases = m["aliases"]
        if not isinstance(aliases, dict):
            raise EventError(f"{where}: field 'aliases' must be an object")
        for a, n in aliases.items():
            if not _name(a) or not _int_version(n) or str(n) not in m["versions"]:
                raise EventError(f"{where}: alias {a!r} must point at an existing version "
                                 f"(got {n!r})")
    return state


_VERSION_FIELDS = ("description", "tags", "stage", "run_id", "source", "artifacts")


def is_internal_tag(key: str) -> bool:
    return key.startswith(INTERNAL_TAG_PREFIX)


def is_internal_model(name: str) -> bool:
    return name.startswith(CHECKPOINT_MODEL_PREFIX)


def public_tags(tags: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in tags.items() if not is_internal_tag(k)}


# -- diff --------------------------------------------------------------------------------

def _versions(m: Mapping[str, Any]) -> list[int]:
    return sorted(int(n) for n in m["versions"])


def _immutable(v: Mapping[str, Any]) -> tuple[Any, ...]:
    return (v["run_id"], v["source"], v["artifacts"])


def _is_rename(old_m: Mapping[str, Any], new_m: Mapping[str, Any]) -> int:
    """How many versions say `new_m` is `old_m` renamed (0: not a rename)."""
    common = set(old_m["versions"]) & set(new_m["versions"])
    if not common:
        return 0
    for n in common:
        a, b = old_m["versions"][n], new_m["versions"][n]
        if _immutable(a) != _immutable(b):
            return 0
    return len(common)


def _replaced(old_m: Mapping[str, Any], new_m: Mapping[str, Any]) -> bool:
    """Same name, but a version number now means another version: deleted and recreated."""
    return any(_immutable(old_m["versions"][n]) != _immutable(new_m["versions"][n])
               for n in set(old_m["versions"]) & set(new_m["versions"]))


def _tag_events(prefix: dict[str, Any], etype: str, old: Mapping[str, str],
                new: Mapping[str, str]) -> list[Event]:
    out: list[Event] = []
    old, new = public_tags(old), public_tags(new)
    for k in sorted(new):
        if old.get(k) != new[k]:
            out.append({"type": f"{etype}.tag.set", **prefix, "key": k, "value": new[k]})
    for k in sorted(set(old) - set(new)):
        out.append({"type": f"{etype}.tag.deleted", **prefix, "key": k})
    return out


def _public_models(state: State) -> dict[str, Any]:
    return {n: m for n, m in state["models"].items() if not is_internal_model(n)}


def diff(old: State, new: State) -> list[Event]:
    """The events that turn `old` into `new`, in apply order:

    renames; replaced models' deletions; model creations; version creations (increasing
    version number); descriptions; stages; tags; aliases set; aliases deleted; versions
    deleted; models deleted."""
    old_models, new_models = _public_models(old), _public_models(new)

    # Renames: a model gone under its old name whose versions (numbers and immutable
    # fields) reappear under a name that is new.
    gone = sorted(set(old_models) - set(new_models))
    fresh = sorted(set(new_models) - set(old_models))
    renames: list[tuple[str, str]] = []
    taken: set[str] = set()
    for o in gone:
        best, score = None, 0
        for cand in fresh:
            if cand in taken:
                continue
            hits = _is_rename(old_models[o], new_models[cand])
            if hits > score:
                best, score = cand, hits
        if best is not None:
            renames.append((o, best))
            taken.add(best)
    mid = dict(old_models)
    for src, dst in renames:
        mid[dst] = mid.pop(src)

    renamed = [{"type": "model.renamed", "name": s, "new_name": d} for s, d in renames]
    replaced = sorted(x for x in set(mid) & set(new_models)
                      if _replaced(mid[x], new_models[x]))
    for x in replaced:
        del mid[x]
    early_deletes = [{"type": "model.deleted", "name": x} for x in replaced]

    created: list[Event] = []
    v_created: list[Event] = []
    descriptions: list[Event] = []
    stages: list[Event] = []
    tags: list[Event] = []
    alias_set: list[Event] = []
    alias_deleted: list[Event] = []
    v_deleted: list[Event] = []
    deleted = [{"type": "model.deleted", "name": x} for x in sorted(set(mid) - set(new_models))]

    empty: dict[str, Any] = {"description": "", "tags": {}, "aliases": {}, "versions": {}}
    for name in sorted(new_models):
        nm = new_models[name]
        om = mid.get(name)
        if om is None:
            created.append({"type": "model.created", "name": name,
                            "description": nm["description"], "tags": public_tags(nm["tags"])})
            om = empty
        else:
            if om["description"] != nm["description"]:
                descriptions.append({"type": "model.description", "name": name,
                                     "description": nm["description"]})
            tags += _tag_events({"name": name}, "model", om["tags"], nm["tags"])
        for n in _versions(nm):
            nv = nm["versions"][str(n)]
            ov = om["versions"].get(str(n))
            if ov is None:
                v_created.append({"type": "version.created", "name": name, "version": n,
                                  "description": nv["description"],
                                  "tags": public_tags(nv["tags"]), "stage": nv["stage"],
                                  "run_id": nv["run_id"], "source": nv["source"],
                                  "artifacts": copy.deepcopy(nv["artifacts"])})
                continue
            if ov["description"] != nv["description"]:
                descriptions.append({"type": "version.description", "name": name,
                                     "version": n, "description": nv["description"]})
            if ov["stage"] != nv["stage"]:
                stages.append({"type": "version.stage", "name": name, "version": n,
                               "stage": nv["stage"]})
            tags += _tag_events({"name": name, "version": n}, "version", ov["tags"], nv["tags"])
        for a in sorted(nm["aliases"]):
            if om["aliases"].get(a) != nm["aliases"][a]:
                alias_set.append({"type": "alias.set", "name": name, "alias": a,
                                  "version": nm["aliases"][a]})
        for a in sorted(set(om["aliases"]) - set(nm["aliases"])):
            alias_deleted.append({"type": "alias.deleted", "name": name, "alias": a})
        for n in _versions(om):
            if str(n) not in nm["versions"]:
                v_deleted.append({"type": "version.deleted", "name": name, "version": n})

    return [*renamed, *early_deletes, *created, *v_created, *descriptions, *stages, *tags,
            *alias_set, *alias_deleted, *v_deleted, *deleted]


# -- fold --------------------------------------------------------------------------------

def _model(state: State, ev: Event) -> dict[str, Any]:
    m = state["models"].get(ev["name"])
    if m is None:
        raise EventError(f"{ev['type']}: model {ev['name']!r} does not exist")
    return m  # type: ignore[no-any-return]


def _version(state: State, ev: Event) -> dict[str, Any]:
    v = _model(state, ev)["versions"].get(str(ev["version"]))
    if v is None:
        raise EventError(f"{ev['type']}: model {ev['name']!r} version {ev['version']} "
                         f"does not exist")
    return v  # type: ignore[no-any-return]


def apply_event(state: State, ev: Event) -> None:
    """Apply one validated event to `state` in place; EventError if it does not fit."""
    t = ev["type"]
    models = state["models"]
    if t == "model.created":
        if ev["name"] in models:
            raise EventError(f"model.created: model {ev['name']!r} already exists")
        models[ev["name"]] = {"description": ev["description"], "tags": dict(ev["tags"]),
                              "aliases": {}, "versions": {}}
    elif t == "model.renamed":
        m = _model(state, ev)
        if ev["new_name"] in models:
            raise EventError(f"model.renamed: model {ev['new_name']!r} already exists")
        del models[ev["name"]]
        models[ev["new_name"]] = m
    elif t == "model.description":
        _model(state, ev)["description"] = ev["description"]
    elif t == "model.deleted":
        _model(state, ev)
        del models[ev["name"]]
    elif t == "model.tag.set":
        _model(state, ev)["tags"][ev["key"]] = ev["value"]
    elif t == "model.tag.deleted":
        _model(state, ev)["tags"].pop(ev["key"], None)
    elif t == "version.created":
        m = _model(state, ev)
        if str(ev["version"]) in m["versions"]:
            raise EventError(f"version.created: model {ev['name']!r} version "
                             f"{ev['version']} already exists")
        m["versions"][str(ev["version"])] = {
            "description": ev["description"], "tags": dict(ev["tags"]), "stage": ev["stage"],
            "run_id": ev["run_id"], "source": ev["source"],
            "artifacts": copy.deepcopy(ev["artifacts"])}
    elif t == "version.description":
        _version(state, ev)["description"] = ev["description"]
    elif t == "version.stage":
        _version(state, ev)["stage"] = ev["stage"]
    elif t == "version.tag.set":
        _version(state, ev)["tags"][ev["key"]] = ev["value"]
    elif t == "version.tag.deleted":
        _version(state, ev)["tags"].pop(ev["key"], None)
    elif t == "version.deleted":
        _version(state, ev)
        m = _model(state, ev)
        del m["versions"][str(ev["version"])]
        # MLflow drops the aliases of a deleted version with it
        m["aliases"] = {a: n for a, n in m["aliases"].items() if n != ev["version"]}
    elif t == "alias.set":
        _version(state, ev)
        _model(state, ev)["aliases"][ev["alias"]] = ev["version"]
    elif t == "alias.deleted":
        _model(state, ev)["aliases"].pop(ev["alias"], None)
    else:  # pragma: no cover - validate_event rejects unknown types
        raise EventError(f"unknown registry event type {t!r}")


def fold(state: State, events: Iterable[Event]) -> State:
    """The state after `events` (validated one by one); `state` itself is not changed."""
    out = copy.deepcopy(state)
    for ev in events:
        apply_event(out, validate_event(ev))
    return out
