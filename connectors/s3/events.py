"""Object stream events: what the object source writes into the log for each change of a
bucket prefix, and what the object sink, replay and drill read (docs/format.md, "Object
events"). Small JSON documents, one per object version or delete:

    {"type": "object.put", "key", "version_id" (str|null), "size", "sha256", "etag",
     "last_modified_ms", "content_type" (str|null), "metadata" {str: str},
     "headers" {CacheControl|ContentDisposition|ContentEncoding|ContentLanguage: str},
     "chunks" [blob id, ...], "seen_ms"}
    {"type": "object.deleted", "key", "version_id" (str|null: the delete marker),
     "last_modified_ms" (int|null: the marker's; null when a listing found the key gone),
     "seen_ms"}

`key` is relative to the source prefix; `seen_ms` is when the source read the change.
"""

from __future__ import annotations

from typing import Any

from drstream.daemon.blobs import BLOB_ID_RE

ObjectEvent = dict[str, Any]

HEADERS = ("CacheControl", "ContentDisposition", "ContentEncoding", "ContentLanguage")
MAX_KEY_BYTES = 1024  # S3's limit on a key


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _int(v: Any) -> bool:
    return type(v) is int and v >= 0


def _common(ev: dict[str, Any]) -> None:
    key = ev.get("key")
    _need(isinstance(key, str) and 0 < len(key.encode()) <= MAX_KEY_BYTES,
          f"key {key!r:.200} is not a 1-{MAX_KEY_BYTES} byte string")
    _need(_opt_str(ev.get("version_id")), "version_id is not a string or null")
    _need(_int(ev.get("seen_ms")), "seen_ms is not a non-negative integer")


PUT_FIELDS = frozenset({"type", "key", "version_id", "size", "sha256", "etag",
                        "last_modified_ms", "content_type", "metadata", "headers", "chunks",
                        "seen_ms"})
DELETE_FIELDS = frozenset({"type", "key", "version_id", "last_modified_ms", "seen_ms"})


def validate_event(ev: Any) -> ObjectEvent:
    """`ev` when it is a well-formed object event; ValueError naming what is wrong."""
    _need(isinstance(ev, dict), f"not an object: {type(ev).__name__}")
    kind = ev.get("type")
    fields = {"object.put": PUT_FIELDS, "object.deleted": DELETE_FIELDS}.get(kind)
    _need(fields is not None, f"unknown event type {kind!r:.80}")
    assert fields is not None
    _need(set(ev) == fields, f"{kind}: fields {sorted(set(ev) ^ fields)} missing or unknown")
    _common(ev)
    if kind == "object.deleted":
        lm = ev["last_modified_ms"]
        _need(lm is None or _int(lm), "last_modified_ms is not an integer or null")
        return dict(ev)
    _need(_int(ev["size"]), "size is not a non-negative integer")
    _need(isinstance(ev["sha256"], str) and BLOB_ID_RE.fullmatch(ev["sha256"]) is not None,
          "sha256 is not 64 lowercase hex digits")
    _need(isinstance(ev["etag"], str), "etag is not a string")
    _need(_int(ev["last_modified_ms"]), "last_modified_ms is not a non-negative integer")
    _need(_opt_str(ev["content_type"]), "content_type is not a string or null")
    for name in ("metadata", "headers"):
        m = ev[name]
        _need(isinstance(m, dict) and all(isinstance(k, str) and isinstance(v, str)
                                          for k, v in m.items()), f"{name} is not {{str: str}}")
    _need(set(ev["headers"]) <= set(HEADERS), f"headers {sorted(ev['headers'])} not in {HEADERS}")
    chunks = ev["chunks"]
    _need(isinstance(chunks, list) and len(chunks) > 0 and all(
        isinstance(c, str) and BLOB_ID_RE.fullmatch(c) for c in chunks),
        "chunks is not a non-empty list of blob ids")
    return dict(ev)
