"""Audit records: what an operator action (drill, failover) did, stored beside the log.

Each record is one JSON object under `audit/` (daemon.layout.audit_key), written
create-if-absent so a record is never replaced.
"""

from __future__ import annotations

import json
from typing import Any

from drstream.daemon.errors import DrstreamError
from drstream.daemon.layout import audit_key
from drstream.daemon.store import Store


async def store_report(store: Store, log_id: str, report: dict[str, Any]) -> dict[str, Any]:
    """Store `report` (its "action" names it) and add the key as `audit_object`."""
    key = audit_key(report["action"], log_id)
    if not await store.put_if_absent(key, json.dumps(report, indent=2, default=str).encode()):
        raise DrstreamError(f"audit object {key} already exists; report not stored")
    report["audit_object"] = key
    return report
