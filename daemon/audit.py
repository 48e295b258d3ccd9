"""Audit records: what an operator action (drill, failover, prune, log truncate) did,
stored beside the log.

Each record is one JSON object under `audit/` (daemon.layout.audit_key), written
create-if-absent so a record is never replaced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from drstream.daemon.errors import DrstreamError
from drstream.daemon.layout import AUDIT, audit_key, audit_of
from drstream.daemon.store import Store

MAX_AUDIT_BYTES = 16 << 20  # a report names at most a few thousand objects


async def store_report(store: Store, log_id: str, report: dict[str, Any]) -> dict[str, Any]:
    """Store `report` (its "action" names it) and add the key as `audit_object`."""
    key = audit_key(report["action"], log_id)
    if not await store.put_if_absent(key, json.dumps(report, indent=2, default=str).encode()):
        raise DrstreamError(f"audit object {key} already exists; report not stored")
    report["audit_object"] = key
    return report


@dataclass
class ActionReport:
    """The report of an operator action that changes the log (log truncate, shards
    change): "action", the log, what the action did (`body`), and the audit object it
    was stored as once `record` has stored it."""

    action: ClassVar[str]
    log_id: str
    audit_object: str = field(default="", kw_only=True)

    def body(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "log_id": self.log_id, **self.body(),
                "audit_object": self.audit_object}

    async def record(self, store: Store, **extra: Any) -> None:
        """Store the report, with `extra` fields beside it, under audit/."""
        stored = await store_report(store, self.log_id, self.to_json() | extra)
        self.audit_object = stored["audit_object"]


async def audit_records(store: Store, action: str, log_id: str) -> list[dict[str, Any]]:
    """Every stored audit record of `action` on `log_id`, oldest first."""
    out = []
    async for key in store.list(AUDIT):
        if audit_of(key, action, log_id):
            raw = await store.get(key, max_bytes=MAX_AUDIT_BYTES)
            try:
                doc = json.loads(raw or b"null")
            except ValueError:
                continue  # not ours to judge here; verify reports the log, not audit/
            if isinstance(doc, dict):
                out.append(doc)
    return out


async def pruned_ranges(store: Store, log_id: str) -> list[tuple[int, int]]:
    """The seqs `drstream prune` removed, as (first, last) ranges from its audit records."""
    return sorted((int(r.get("deleted_from_seq") or 0), int(r.get("deleted_through_seq") or 0))
                  for r in await audit_records(store, "prune", log_id))


def uncovered(lo: int, hi: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of lo..hi that no (first, last) range of the sorted `ranges` covers."""
    out, cursor = [], lo
    for a, b in ranges:
        if cursor > hi:
            break
        if a > cursor:
            out.append((cursor, min(a - 1, hi)))
        cursor = max(cursor, b + 1)
    if cursor <= hi:
        out.append((cursor, hi))
    return out
