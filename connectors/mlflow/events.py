"""Registry state and the typed events that turn one state into the next.

The `mlflow` source snapshots the primary registry into a `RegistryState` (a JSON-native
dict, shape below), diffs it against the last state it shipped and writes the events
into the log; the `mlflow` sink replays them on the standby. Both sides rely on

    fold(old, diff(old, new)) == new

State (canonical JSON = sorted keys, compact separators, ASCII):

    {"models": {name: {"description": str, "tags": {k: v}, "aliases": {alias: version},
       "created_ms": int (optional),
       "versions": {"<n>": {"description": str, "tags": {k: v}, "stage": str,
          "run_id": str | null, "source": str,
          "artifacts": [{"path": str, "size": int, "sha256": hex, "chunks": [hex]}]}}}}}

A model is more than its name: `created_ms` (the primary's creation time of the registered
model; a rename keeps it, a model deleted and created again under its name gets a new
one) and its versions (numbers whose run, source and files never change) tell which old
model, if any, a model of the new state is. `diff` ships a re-created name as delete +
create and a rename as a rename, never as edits of another model. States and events
written before models carried `created_ms` still load and fold; such models are matched
by name and versions alone.

Tags whose key starts with `drstream.` are drstream's own bookkeeping on a standby and
are never diffed; nor are the sink's checkpoint models (`drstream.checkpoint.*`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from drstream.daemon.errors import DrstreamError

if TYPE_CHECKING:
    from drstream.daemon.blobs import BlobStore

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


def _timestamp(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


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


# Each check, what it wants (for the error), and the event fields it checks.
_CHECKERS: tuple[tuple[Callable[[Any], bool], str, tuple[str, ...]], ...] = (
    (_name, "a non-empty string", ("name", "new_name", "key", "alias")),
    (_str, "a string", ("description", "value", "stage", "source")),
    (_opt_str, "a string or null", ("run_id",)),
    (_int_version, "an integer >= 1", ("version",)),
    (_timestamp, "an integer >= 0 (milliseconds since the epoch)", ("created_ms",)),
    (_tags, "an object of string -> string (non-empty keys)", ("tags",)),
)
_CHECKS = {f: (check, wants) for check, wants, fields in _CHECKERS for f in fields}

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
# Fields an event may leave out: logs written before models carried an identity.
OPTIONAL_FIELDS: dict[str, tuple[str, ...]] = {"model.created": ("created_ms",)}


def validate_event(ev: Any) -> Event:
    """Return `ev` if it is a well-formed event; raise EventError naming the bad field."""
    if not isinstance(ev, dict):
        raise EventError(f"registry event must be an object, got {type(ev).__name__}")
    etype = ev.get("type")
    if etype not in EVENT_FIELDS:
        raise EventError(f"registry event: field 'type' must be one of "
                         f"{sorted(EVENT_FIELDS)} (got {etype!r})")
    fields = EVENT_FIELDS[etype]
    optional = OPTIONAL_FIELDS.get(etype, ())
    what = f"registry event {etype}"
    if isinstance(ev.get("name"), str):
        what += f" (model {ev['name']!r})"
    for f in (*fields, *optional):
        if f not in ev:
            if f in optional:
                continue
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
    extra = set(ev) - set(fields) - set(optional) - {"type"}
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


async def seed_events(blobs: BlobStore, positions: Mapping[str, Any]
                      ) -> tuple[State, list[Event]] | None:
    """For the first segment of a pruned log: the registry state its positions name and
    the events that build it from nothing (the events before it are gone, the state after
    it is not); None when the positions name no state."""
    found = await read_state_blob(blobs, positions)
    if found is None:
        return None
    return found[1], diff(empty_state(), found[1])


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
        if not isinstance(m, dict) or not _MODEL_FIELDS <= set(m) <= {*_MODEL_FIELDS,
                                                                      "created_ms"}:
            raise EventError(f"{where} must have exactly description, tags, aliases, versions "
                             "(and created_ms)")
        for f in ("description", "tags", "created_ms"):
            if f in m and not _CHECKS[f][0](m[f]):
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


_MODEL_FIELDS = frozenset({"description", "tags", "aliases", "versions"})
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


def _common(old_m: Mapping[str, Any], new_m: Mapping[str, Any]) -> int | None:
    """How many version numbers the two have in common naming the same version; None
    when one names another version in each (so they are not one model: MLflow never
    numbers two versions of a model alike)."""
    common = set(old_m["versions"]) & set(new_m["versions"])
    if any(_immutable(old_m["versions"][n]) != _immutable(new_m["versions"][n])
           for n in common):
        return None
    return len(common)


def _identity(m: Mapping[str, Any]) -> int | None:
    return m.get("created_ms")


def _match(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, str]:
    """Old name -> new name of every model that is in both states (renamed or not).

    A model is the one with its identity (`created_ms`) whose versions agree with it;
    among models created in the same millisecond, the one that kept its name, else the
    one sharing most versions (then name order). Where a side has no identity (a state
    written before identities), a model keeps its name unless a version now names
    another, and one gone under its name was renamed if its versions reappear under a
    name that no other model holds."""
    pairs: dict[str, str] = {}
    taken: set[str] = set()
    old_ids = {_identity(m) for m in old.values()} - {None}
    by_id: dict[Any, list[str]] = {}
    for n in sorted(new):
        by_id.setdefault(_identity(new[n]), []).append(n)

    def no_id(o: str, n: str) -> bool:
        c = _identity(new[n])
        return (_identity(old[o]) is None or c is None) and c not in old_ids

    def take(o: str, candidates: Iterable[str], need: int = 0) -> None:
        scored = [(score, n) for n in candidates if n not in taken
                  and (score := _common(old[o], new[n])) is not None and score >= need]
        if o not in pairs and scored:
            pairs[o] = max(scored, key=lambda sn: sn[0])[1]  # first best: name order
            taken.add(pairs[o])

    same_id = {o: by_id.get(_identity(old[o]), []) if _identity(old[o]) is not None else []
               for o in old}
    for o in sorted(old):
        take(o, [o] if o in same_id[o] else [])
    for o in sorted(old):
        take(o, same_id[o])
    for o in sorted(old):
        take(o, [o] if o in new and no_id(o, o) else [])
    legacy = [n for n in sorted(new) if _identity(new[n]) not in old_ids]
    for o in sorted(set(old) - set(pairs)):  # few: models gone under their name
        take(o, [n for n in legacy if no_id(o, n)], need=1)
    return pairs


def adopt_identities(old: State, new: State) -> State:
    """`old`, its models without an identity (a state written before identities) given
    the one of the model of `new` that `diff` takes them to be: from then on a model
    deleted and created again is told apart even when no version number is common."""
    if all(_identity(m) is not None for m in old["models"].values()):
        return old
    out = copy.deepcopy(old)
    for o, n in _match(_public_models(old), _public_models(new)).items():
        if _identity(out["models"][o]) is None and _identity(new["models"][n]) is not None:
            out["models"][o]["created_ms"] = _identity(new["models"][n])
    return out


def _free_name(name: str, taken: set[str]) -> str:
    """A name for a model on its way to a name another model still holds (a swap)."""
    k = 1
    while (tmp := f"{name} (drstream rename {k})") in taken:
        k += 1
    return tmp


def _rename_events(renames: list[tuple[str, str]], names: set[str],
                   avoid: set[str]) -> list[Event]:
    """The renames in an order that never takes a name in use (`names`, updated as the
    renames go); models that swap names move aside to a free name first."""
    todo, out = sorted(renames), []
    while todo:
        i = next((i for i, (_, dst) in enumerate(todo) if dst not in names), None)
        src, dst = todo.pop(0 if i is None else i)
        if i is None:  # every target is held by a model still to move: a cycle
            tmp = _free_name(src, names | avoid)
            todo.insert(0, (tmp, dst))
            dst = tmp
        out.append({"type": "model.renamed", "name": src, "new_name": dst})
        names.remove(src)
        names.add(dst)
    return out


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

    deletions of models whose name a rename or a creation takes; renames; model
    creations; version creations (increasing version number); descriptions; stages;
    tags; aliases set; aliases deleted; versions deleted; the other model deletions."""
    old_models, new_models = _public_models(old), _public_models(new)
    pairs = _match(old_models, new_models)
    renames = [(o, n) for o, n in pairs.items() if o != n]
    taken = {n for _, n in renames} | (set(new_models) - set(pairs.values()))
    gone = sorted(set(old_models) - set(pairs))
    early = [{"type": "model.deleted", "name": x} for x in gone if x in taken]
    deleted = [{"type": "model.deleted", "name": x} for x in gone if x not in taken]
    renamed = _rename_events(renames, set(old_models) - {e["name"] for e in early},
                             set(old["models"]) | set(new["models"]))
    mid = {n: old_models[o] for o, n in pairs.items()}

    created: list[Event] = []
    v_created: list[Event] = []
    descriptions: list[Event] = []
    stages: list[Event] = []
    tags: list[Event] = []
    alias_set: list[Event] = []
    alias_deleted: list[Event] = []
    v_deleted: list[Event] = []

    empty: dict[str, Any] = {"description": "", "tags": {}, "aliases": {}, "versions": {}}
    for name in sorted(new_models):
        nm = new_models[name]
        om = mid.get(name)
        if om is None:
            created.append({"type": "model.created", "name": name,
                            "description": nm["description"], "tags": public_tags(nm["tags"]),
                            **({} if _identity(nm) is None else {"created_ms": _identity(nm)})})
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

    return [*early, *renamed, *created, *v_created, *descriptions, *stages, *tags,
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
        if "created_ms" in ev:
            models[ev["name"]]["created_ms"] = ev["created_ms"]
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
