"""Registry events: fold(old, diff(old, new)) == new, ordering, renames, malformed events."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drstream.connectors.mlflow.events import (
    EVENT_FIELDS,
    EventError,
    adopt_identities,
    diff,
    dump_state,
    empty_state,
    fold,
    load_state,
    state_digest,
    validate_event,
    validate_state,
)

NAMES = st.sampled_from(["a", "b", "c", "d", "model-e", "Ünï"])
KEYS = st.sampled_from(["k1", "k2", "owner", "team", "drstream.source"])
TEXT = st.text(alphabet="xyz é\n", max_size=6)
STAGES = st.sampled_from(["None", "Staging", "Production", "Archived"])
SOURCES = st.sampled_from(["s3://b/1", "s3://b/2", "models:/m-1", "runs:/r/model"])


def hexid(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


artifact = st.builds(
    lambda path, size, i: {"path": path, "size": size, "sha256": hexid(i),
                           "chunks": [hexid(i + 1)] if size else []},
    st.sampled_from(["MLmodel", "model.pkl", "data/weights.bin"]),
    st.integers(0, 10**10), st.integers(0, 5))


@st.composite
def versions(draw: Any) -> dict[str, Any]:
    numbers = draw(st.sets(st.integers(1, 8), max_size=4))
    out = {}
    for n in numbers:
        arts = draw(st.lists(artifact, max_size=2, unique_by=lambda a: a["path"]))
        out[str(n)] = {"description": draw(TEXT), "tags": draw(tags()),
                       "stage": draw(STAGES), "run_id": draw(st.none() | st.just("run1")),
                       "source": draw(SOURCES), "artifacts": arts}
    return out


def tags() -> st.SearchStrategy[dict[str, str]]:
    return st.dictionaries(KEYS.filter(lambda k: not k.startswith("drstream.")), TEXT,
                           max_size=3)


IDENTITIES = st.integers(1, 6)  # a small range: two models created in one millisecond


@st.composite
def states(draw: Any, identities: bool = True) -> dict[str, Any]:
    models = {}
    for name in draw(st.sets(NAMES, max_size=4)):
        vs = draw(versions())
        aliases = {}
        if vs:
            for a in draw(st.sets(st.sampled_from(["champion", "prod", "x"]), max_size=2)):
                aliases[a] = int(draw(st.sampled_from(sorted(vs))))
        models[name] = {"description": draw(TEXT), "tags": draw(tags()), "aliases": aliases,
                        "versions": vs}
        if identities:
            models[name]["created_ms"] = draw(IDENTITIES)
    return validate_state({"models": models})


@st.composite
def evolved(draw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(old, new) where new is old after registry-like changes: edits, deletions,
    renames (to any free name, also one freed in the same step, and swaps), models
    deleted and created again under their name (a new identity, numbering from 1), and
    renames whose old name is taken at once by a new model."""
    old = draw(states())
    new = copy.deepcopy(old)
    models = new["models"]
    later = 100  # identities of models created in this step: after every old one
    for name in sorted(old["models"]):
        if name not in models or models[name]["created_ms"] != old["models"][name]["created_ms"]:
            continue  # moved or replaced already in this step
        op = draw(st.sampled_from(["keep", "rename", "delete", "edit", "recreate",
                                   "rename+reuse", "swap"]))
        if op in ("rename", "rename+reuse"):
            target = draw(NAMES)
            if target not in models:
                models[target] = models.pop(name)
                if op == "rename+reuse":
                    later += 1
                    models[name] = fresh_model(draw, later)
        elif op == "swap":
            other = draw(st.sampled_from(sorted(models)))
            models[name], models[other] = models[other], models[name]
        elif op == "delete":
            del models[name]
        elif op == "recreate":
            later += 1
            models[name] = fresh_model(draw, later)
        elif op == "edit":
            m = models[name]
            m["description"] = draw(TEXT)
            m["tags"] = draw(tags())
            top = max([int(n) for n in m["versions"]] + [0])  # deleted numbers stay used
            for n in list(m["versions"]):
                if draw(st.booleans()):
                    del m["versions"][n]
                    m["aliases"] = {a: v for a, v in m["aliases"].items() if str(v) != n}
                else:
                    m["versions"][n]["stage"] = draw(STAGES)
                    m["versions"][n]["description"] = draw(TEXT)
                    m["versions"][n]["tags"] = draw(tags())
            for n in range(top + 1, top + 1 + draw(st.integers(0, 2))):
                m["versions"][str(n)] = draw(versions().filter(bool)).popitem()[1]
            if m["versions"] and draw(st.booleans()):
                m["aliases"]["champion"] = int(draw(st.sampled_from(sorted(m["versions"]))))
    return old, validate_state(new)


def fresh_model(draw: Any, created_ms: int) -> dict[str, Any]:
    """A model just created on the primary: its versions are numbered from 1 again."""
    vs = {str(n): draw(versions().filter(bool)).popitem()[1]
          for n in range(1, 1 + draw(st.integers(0, 2)))}
    return {"description": draw(TEXT), "tags": draw(tags()), "aliases": {}, "versions": vs,
            "created_ms": created_ms}


PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(states(), states())
def test_fold_diff_is_new_for_any_two_states(old: dict[str, Any], new: dict[str, Any]) -> None:
    events = diff(old, new)
    for ev in events:
        validate_event(ev)
    assert fold(old, events) == new
    json.dumps(events)  # JSON-native


@PROPS
@given(evolved())
def test_fold_diff_is_new_for_evolved_states(pair: tuple[dict[str, Any], dict[str, Any]]) -> None:
    old, new = pair
    before = copy.deepcopy(old)
    events = diff(old, new)
    assert fold(old, events) == new
    assert old == before  # neither diff nor fold changes its input
    check_order(old, events)
    check_identity(old, new, events)
    check_standby_numbering(old, events)


@PROPS
@given(states())
def test_diff_of_equal_states_is_empty(s: dict[str, Any]) -> None:
    assert diff(s, copy.deepcopy(s)) == []
    assert diff(empty_state(), s) == diff(empty_state(), copy.deepcopy(s))


@PROPS
@given(states())
def test_canonical_json_round_trip(s: dict[str, Any]) -> None:
    raw = dump_state(s)
    assert load_state(raw) == s
    # canonical: key order of the input does not matter
    shuffled = json.loads(json.dumps(s))
    shuffled["models"] = dict(reversed(list(shuffled["models"].items())))
    assert dump_state(shuffled) == raw
    assert state_digest(shuffled) == hashlib.sha256(raw).hexdigest()
    assert raw == json.dumps(s, sort_keys=True, separators=(",", ":")).encode()


def check_order(old: dict[str, Any], events: list[dict[str, Any]]) -> None:
    types = [e["type"] for e in events]
    idx = {t: [i for i, x in enumerate(types) if x == t] for t in EVENT_FIELDS}
    # deletions that free a name a rename or a creation needs, then renames, first
    freed = {e["new_name"] for e in events if e["type"] == "model.renamed"} | \
        {e["name"] for e in events if e["type"] == "model.created"}
    early = [i for i in idx["model.deleted"] if events[i]["name"] in freed]
    assert early + idx["model.renamed"] == list(range(len(early) + len(idx["model.renamed"])))
    # creations before the aliases that point at them
    created_at = {(e["name"], e["version"]): i for i, e in enumerate(events)
                  if e["type"] == "version.created"}
    model_at = {e["name"]: i for i, e in enumerate(events) if e["type"] == "model.created"}
    for i, e in enumerate(events):
        if e["type"] == "alias.set" and (e["name"], e["version"]) in created_at:
            assert created_at[(e["name"], e["version"])] < i
        if e["type"] == "version.created" and e["name"] in model_at:
            assert model_at[e["name"]] < i
    # alias deletions before version deletions; model deletions (not replacements) last
    if idx["alias.deleted"] and idx["version.deleted"]:
        assert max(idx["alias.deleted"]) < min(idx["version.deleted"])
    # version creations in increasing version order within a model
    for name in {e["name"] for e in events if e["type"] == "version.created"}:
        nums = [e["version"] for e in events
                if e["type"] == "version.created" and e["name"] == name]
        assert nums == sorted(nums)


def _unique_identities(state: dict[str, Any]) -> dict[int, str]:
    """created_ms -> name, for the identities only one model of `state` has."""
    seen: dict[int, list[str]] = {}
    for name, m in state["models"].items():
        if m.get("created_ms") is not None:
            seen.setdefault(m["created_ms"], []).append(name)
    return {c: names[0] for c, names in seen.items() if len(names) == 1}


def check_identity(old: dict[str, Any], new: dict[str, Any],
                   events: list[dict[str, Any]]) -> None:
    """A model that is in both states (same identity) is never deleted and created again
    (a rename is a rename), and a name whose model was replaced is never edited into the
    new one: fold == new already says the new identity came with a model.created."""
    before, after = _unique_identities(old), _unique_identities(new)
    created = {e.get("created_ms") for e in events if e["type"] == "model.created"}
    for c in set(before) & set(after):
        assert c not in created, f"model {before[c]!r} -> {after[c]!r} was created anew"
    renames = {(e["name"], e["new_name"]) for e in events if e["type"] == "model.renamed"}
    for c in set(before) & set(after):
        if before[c] != after[c]:
            assert renames, f"model {before[c]!r} -> {after[c]!r} was not renamed"


def check_standby_numbering(old: dict[str, Any], events: list[dict[str, Any]]) -> None:
    """The events can be replayed on an MLflow registry, which numbers a model's versions
    upward only (a deleted number is never handed out again in the same model; a model
    created anew starts at 1): every version.created is above what its model had.
    Models created in one millisecond with versions of the same content can only be
    told apart by name, so states with such twins are left out here."""
    if len(_unique_identities(old)) < len(old["models"]):
        return
    high = {name: max(map(int, m["versions"]), default=0)
            for name, m in old["models"].items()}
    for e in events:
        t = e["type"]
        if t == "model.created":
            high[e["name"]] = 0
        elif t == "model.renamed":
            high[e["new_name"]] = high.pop(e["name"])
        elif t == "model.deleted":
            del high[e["name"]]
        elif t == "version.created":
            assert e["version"] > high[e["name"]], \
                f"{e['name']!r}: version {e['version']} after {high[e['name']]} in one model"
            high[e["name"]] = e["version"]


def model(versions: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"description": "", "tags": {}, "aliases": {}, "versions": versions, **kw}


def version(source: str, **kw: Any) -> dict[str, Any]:
    return {"description": "", "tags": {}, "stage": "None", "run_id": None, "source": source,
            "artifacts": [], **kw}


def test_rename_is_detected_and_comes_first() -> None:
    old = {"models": {"old": model({"1": version("s3://x/1"), "3": version("s3://x/3")},
                                   aliases={"prod": 3})}}
    new = {"models": {"new": model({"1": version("s3://x/1"), "3": version("s3://x/3"),
                                    "4": version("s3://x/4")},
                                   aliases={"prod": 4}, description="renamed"),
                      "a-new-one": model({})}}
    events = diff(old, new)
    assert events[0] == {"type": "model.renamed", "name": "old", "new_name": "new"}
    assert [e["type"] for e in events[1:]] == [
        "model.created", "version.created", "model.description", "alias.set"]
    assert events[2]["version"] == 4
    assert fold(old, events) == new


def test_not_a_rename_when_sources_differ() -> None:
    old = {"models": {"old": model({"1": version("s3://x/1")})}}
    new = {"models": {"new": model({"1": version("s3://y/1")})}}
    assert [e["type"] for e in diff(old, new)] == [
        "model.created", "version.created", "model.deleted"]


def test_model_recreated_under_same_name_is_deleted_first() -> None:
    old = {"models": {"m": model({"1": version("s3://x/1"), "2": version("s3://x/2")})}}
    new = {"models": {"m": model({"1": version("s3://other/1")})}}
    events = diff(old, new)
    assert [e["type"] for e in events] == ["model.deleted", "model.created", "version.created"]
    assert fold(old, events) == new


def types_and_names(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(e["type"], e["name"], *([e["new_name"]] if "new_name" in e else []),
             *([e["version"]] if "version" in e else [])) for e in events]


def test_recreated_name_with_no_version_in_common_is_deleted_and_created() -> None:
    """Deleted and created again under its name between two reconciles: the new model
    has none of the old version numbers yet, or reuses them for other versions. Either
    way it is a new model (numbering from 1 on the standby), never edits of the old."""
    old = {"models": {"m": model({"1": version("s3://x/1"), "2": version("s3://x/2"),
                                  "3": version("s3://x/3")}, tags={"team": "ml"},
                                 aliases={"prod": 3}, created_ms=1000)}}
    empty = {"models": {"m": model({}, created_ms=1400)}}
    events = diff(old, empty)
    assert types_and_names(events) == [("model.deleted", "m"), ("model.created", "m")]
    assert events[1]["created_ms"] == 1400
    assert fold(old, events) == empty
    again = {"models": {"m": model({"1": version("s3://y/1"), "2": version("s3://y/2")},
                                   created_ms=1400)}}
    events = diff(old, again)
    assert types_and_names(events) == [("model.deleted", "m"), ("model.created", "m"),
                                       ("version.created", "m", 1),
                                       ("version.created", "m", 2)]
    assert fold(old, events) == again
    # from the state where the new model had no versions yet: plain version creations
    assert types_and_names(diff(empty, again)) == [("version.created", "m", 1),
                                                   ("version.created", "m", 2)]


def test_rename_and_a_new_model_under_the_old_name_in_one_diff() -> None:
    """Renamed, and a new model takes the old name at once, its version 1 registered from
    the same run (same source and files): the identity tells them apart."""
    v1, v2 = version("runs:/r1/model"), version("runs:/r2/model")
    old = {"models": {"r": model({"1": v1, "2": v2}, aliases={"prod": 2}, created_ms=500)}}
    new = {"models": {"r-v2": model({"1": v1, "2": v2}, aliases={"prod": 2}, created_ms=500),
                      "r": model({"1": copy.deepcopy(v1)}, created_ms=900)}}
    events = diff(old, new)
    assert types_and_names(events) == [("model.renamed", "r", "r-v2"),
                                       ("model.created", "r"), ("version.created", "r", 1)]
    assert fold(old, events) == new


def test_deleted_model_name_taken_by_a_rename() -> None:
    old = {"models": {"a": model({"1": version("s3://a/1")}, created_ms=1),
                      "b": model({"1": version("s3://b/1")}, created_ms=2)}}
    new = {"models": {"a": model({"1": version("s3://b/1")}, created_ms=2)}}
    events = diff(old, new)
    assert types_and_names(events) == [("model.deleted", "a"), ("model.renamed", "b", "a")]
    assert fold(old, events) == new


def test_models_that_swap_names_are_renamed_through_a_free_name() -> None:
    old = {"models": {"a": model({"1": version("s3://a/1")}, created_ms=1),
                      "b": model({"1": version("s3://b/1"), "2": version("s3://b/2")},
                                 created_ms=2)}}
    new = {"models": {"a": copy.deepcopy(old["models"]["b"]),
                      "b": copy.deepcopy(old["models"]["a"])}}
    events = diff(old, new)
    assert [e["type"] for e in events] == ["model.renamed"] * 3
    temp = events[0]["new_name"]
    assert temp not in ("a", "b") and events[-1] == {"type": "model.renamed", "name": temp,
                                                     "new_name": "b"}
    assert fold(old, events) == new


def test_models_created_in_the_same_millisecond_keep_their_identity() -> None:
    old = {"models": {"a": model({"1": version("s3://a/1")}, created_ms=7),
                      "b": model({"1": version("s3://b/1")}, created_ms=7)}}
    new = {"models": {"a": copy.deepcopy(old["models"]["a"]),
                      "c": copy.deepcopy(old["models"]["b"])}}
    assert types_and_names(diff(old, new)) == [("model.renamed", "b", "c")]
    both_renamed = {"models": {"x": copy.deepcopy(old["models"]["b"]),
                               "y": copy.deepcopy(old["models"]["a"])}}
    events = diff(old, both_renamed)
    assert types_and_names(events) == [("model.renamed", "a", "y"),
                                       ("model.renamed", "b", "x")]
    assert fold(old, events) == both_renamed


# A state blob as the previous version of the source wrote it: no model identities.
LEGACY_STATE_BLOB = (
    b'{"models":{"m":{"aliases":{"prod":1},"description":"d","tags":{"team":"ml"},'
    b'"versions":{"1":{"artifacts":[],"description":"","run_id":"r1","source":"runs:/r1/m",'
    b'"stage":"None","tags":{}}}}}}')


def test_a_state_and_events_without_identities_still_load_and_fold() -> None:
    """Logs written before models carried an identity replay as before, and the source
    resumes from their state blob: a model it sees again under the same name with the
    same versions is the same model; one whose version now names another is replaced."""
    legacy = load_state(LEGACY_STATE_BLOB)
    created = [{"type": "model.created", "name": "m", "description": "d",
                "tags": {"team": "ml"}},
               {"type": "version.created", "name": "m", "version": 1, "description": "",
                "tags": {}, "stage": "None", "run_id": "r1", "source": "runs:/r1/m",
                "artifacts": []},
               {"type": "alias.set", "name": "m", "alias": "prod", "version": 1}]
    assert fold(empty_state(), created) == legacy
    live = copy.deepcopy(legacy)
    live["models"]["m"]["created_ms"] = 123
    live["models"]["m"]["versions"]["2"] = version("runs:/r2/m")
    events = diff(legacy, live)
    assert types_and_names(events) == [("version.created", "m", 2)]
    replaced = {"models": {"m": model({"1": version("runs:/other/m")}, created_ms=456)}}
    assert types_and_names(diff(legacy, replaced)) == [
        ("model.deleted", "m"), ("model.created", "m"), ("version.created", "m", 1)]
    # the source gives the old models the identities the registry reports, deciding the
    # same; from then on a re-created name is told apart with no version in common
    adopted = adopt_identities(legacy, live)
    assert adopted["models"]["m"]["created_ms"] == 123 and "created_ms" not in legacy["models"]["m"]
    assert diff(adopted, live) == events
    assert adopt_identities(legacy, replaced) == legacy
    recreated = {"models": {"m": model({}, created_ms=789)}}
    assert types_and_names(diff(adopted, recreated)) == [("model.deleted", "m"),
                                                         ("model.created", "m")]


def test_internal_tags_and_checkpoint_models_are_not_diffed() -> None:
    old = {"models": {"m": model({"1": version("s", tags={"drstream.source": "x"})},
                                 tags={"drstream.source": "mlflow:primary/m"})}}
    new = {"models": {"m": model({"1": version("s")}),
                      "drstream.checkpoint.log.standby": model({}, tags={"seq": "3"})}}
    assert diff(old, new) == []
    created = diff(empty_state(), old)
    assert created[0]["tags"] == {} and created[1]["tags"] == {}


def test_alias_deleted_before_its_version() -> None:
    old = {"models": {"m": model({"1": version("a"), "2": version("b")},
                                 aliases={"champion": 2, "old": 1})}}
    new = {"models": {"m": model({"2": version("b", stage="Production")},
                                 aliases={"champion": 2})}}
    events = diff(old, new)
    assert [e["type"] for e in events] == ["version.stage", "alias.deleted", "version.deleted"]
    assert fold(old, events) == new


GOOD_VERSION = {"type": "version.created", "name": "m", "version": 3, "description": "",
                "tags": {"k": "v"}, "stage": "None", "run_id": None, "source": "s3://b/k",
                "artifacts": [{"path": "data/model.pkl", "size": 3, "sha256": hexid(1),
                               "chunks": [hexid(2)]}]}


@pytest.mark.parametrize(("change", "field"), [
    ({"type": "model.exploded"}, "'type'"),
    ({"version": 0}, "'version'"),
    ({"version": True}, "'version'"),
    ({"version": "3"}, "'version'"),
    ({"name": ""}, "'name'"),
    ({"tags": {"k": 1}}, "'tags'"),
    ({"run_id": 5}, "'run_id'"),
    ({"surprise": 1}, "surprise"),
    ({"artifacts": [{"path": "../../etc/passwd", "size": 1, "sha256": hexid(1),
                     "chunks": [hexid(1)]}]}, "'artifacts[0].path'"),
    ({"artifacts": [{"path": "/abs", "size": 1, "sha256": hexid(1),
                     "chunks": [hexid(1)]}]}, "'artifacts[0].path'"),
    ({"artifacts": [{"path": "a", "size": -1, "sha256": hexid(1),
                     "chunks": [hexid(1)]}]}, "'artifacts[0].size'"),
    ({"artifacts": [{"path": "a", "size": 1, "sha256": "XYZ", "chunks": [hexid(1)]}]},
     "'artifacts[0].sha256'"),
    ({"artifacts": [{"path": "a", "size": 1, "sha256": hexid(1), "chunks": []}]},
     "'artifacts[0].chunks'"),
    ({"artifacts": {"path": "a"}}, "'artifacts'"),
])
def test_malformed_events_are_rejected_naming_the_field(change: dict[str, Any],
                                                        field: str) -> None:
    validate_event(GOOD_VERSION)
    with pytest.raises(EventError, match=re.escape(field)):
        validate_event({**GOOD_VERSION, **change})


@pytest.mark.parametrize("missing", ["name", "version", "artifacts", "source"])
def test_missing_field_is_named(missing: str) -> None:
    ev = {k: v for k, v in GOOD_VERSION.items() if k != missing}
    with pytest.raises(EventError, match=f"'{missing}' is missing"):
        validate_event(ev)


@pytest.mark.parametrize("created_ms", ["5", -1, True, 1.5, None])
def test_model_created_identity_must_be_a_timestamp(created_ms: Any) -> None:
    ev = {"type": "model.created", "name": "m", "description": "", "tags": {}}
    validate_event(ev)
    validate_event({**ev, "created_ms": 1796304259910})
    with pytest.raises(EventError, match="'created_ms'"):
        validate_event({**ev, "created_ms": created_ms})


def test_not_an_object() -> None:
    with pytest.raises(EventError, match="must be an object"):
        validate_event(["model.created"])


def test_fold_rejects_events_that_do_not_apply() -> None:
    with pytest.raises(EventError, match="model 'm' does not exist"):
        fold(empty_state(), [{"type": "model.description", "name": "m", "description": ""}])
    s = fold(empty_state(), [{"type": "model.created", "name": "m", "description": "",
                              "tags": {}}])
    with pytest.raises(EventError, match="version 1 does not exist"):
        fold(s, [{"type": "alias.set", "name": "m", "alias": "a", "version": 1}])
    with pytest.raises(EventError, match="already exists"):
        fold(s, [{"type": "model.created", "name": "m", "description": "", "tags": {}}])


@pytest.mark.parametrize("bad", [
    b"{", b"[]", b'{"models":{}, "x":1}', b'{"models":{"m":{"description":""}}}',
    b'{"models":{"m":{"description":"","tags":{},"aliases":{"a":2},"versions":{}}}}',
    b'{"models":{"m":{"description":"","tags":{},"aliases":{},"versions":{"01":{}}}}}',
    b'{"models":{"m":{"description":"","tags":{},"aliases":{},"versions":{},'
    b'"created_ms":"5"}}}',
    b'{"models":{"m":{"description":"","tags":{},"aliases":{},"versions":{},'
    b'"created_ms":-1}}}',
])
def test_bad_states_are_rejected(bad: bytes) -> None:
    with pytest.raises(EventError):
        load_state(bad)
