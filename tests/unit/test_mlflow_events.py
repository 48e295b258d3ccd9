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

from connectors.mlflow.events import (
    EVENT_FIELDS,
    EventError,
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


@st.composite
def states(draw: Any) -> dict[str, Any]:
    models = {}
    for name in draw(st.sets(NAMES, max_size=4)):
        vs = draw(versions())
        aliases = {}
        if vs:
            for a in draw(st.sets(st.sampled_from(["champion", "prod", "x"]), max_size=2)):
                aliases[a] = int(draw(st.sampled_from(sorted(vs))))
        models[name] = {"description": draw(TEXT), "tags": draw(tags()), "aliases": aliases,
                        "versions": vs}
    return validate_state({"models": models})


@st.composite
def evolved(draw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(old, new) where new is old after registry-like changes (renames included)."""
    old = draw(states())
    new = copy.deepcopy(old)
    models = new["models"]
    for name in sorted(models):
        op = draw(st.sampled_from(["keep", "rename", "delete", "edit"]))
        if op == "rename":
            target = draw(NAMES)
            if target not in models and target not in old["models"]:
                models[target] = models.pop(name)
        elif op == "delete":
            del models[name]
        elif op == "edit":
            m = models[name]
            m["description"] = draw(TEXT)
            m["tags"] = draw(tags())
            for n in list(m["versions"]):
                if draw(st.booleans()):
                    del m["versions"][n]
                    m["aliases"] = {a: v for a, v in m["aliases"].items() if str(v) != n}
                else:
                    m["versions"][n]["stage"] = draw(STAGES)
                    m["versions"][n]["description"] = draw(TEXT)
                    m["versions"][n]["tags"] = draw(tags())
            top = max([int(n) for n in m["versions"]] + [0])
            for n in range(top + 1, top + 1 + draw(st.integers(0, 2))):
                m["versions"][str(n)] = draw(versions().filter(bool)).popitem()[1]
            if m["versions"] and draw(st.booleans()):
                m["aliases"]["champion"] = int(draw(st.sampled_from(sorted(m["versions"]))))
    return old, validate_state(new)


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
    # renames first
    if idx["model.renamed"]:
        assert idx["model.renamed"] == list(range(len(idx["model.renamed"])))
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
])
def test_bad_states_are_rejected(bad: bytes) -> None:
    with pytest.raises(EventError):
        load_state(bad)
