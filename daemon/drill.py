"""`drill`: prove a restore. Replay one stream into a scratch target (scratch topics, a
scratch registry: the stream's kind says), compare it with the log, report the RTO (time
to rebuild), the RPO at the drill point and every mismatch, and store the report under
`audit/` in the log store."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from drstream.daemon.audit import store_report
from drstream.daemon.config import Config
from drstream.daemon.deltalog import DeltaLog
from drstream.daemon.errors import BlobError, DrstreamError, SegmentError
from drstream.daemon.keyring import KeyRing
from drstream.daemon.plugins import Drill, StreamFilter
from drstream.daemon.replay import Progress, replay
from drstream.daemon.segment import parse_header
from drstream.daemon.store import Store


@dataclass
class DrillReport:
    """A drill's stored report (`doc`) and the kind's lines for a person (`lines`)."""

    doc: dict[str, Any]
    lines: list[str]

    @property
    def ok(self) -> bool:
        return bool(self.doc["ok"])


def drill_lines(report: dict[str, Any], counts: Callable[[dict[str, Any]], list[str]],
                mismatch: Callable[[dict[str, Any]], str], *, most: int = 20,
                kept: str = "record") -> list[str]:
    """A kind's lines of a drill report for a person: its `counts` lines, the RPO at the
    drill point (unknown when no `kept` was kept), and the first `most` mismatches, each
    worded by `mismatch`; none when the replay failed (the error is said already)."""
    if "error" in report:
        return []
    rpo = report["rpo_at_point_s"]
    rpo_text = f"unknown (no {kept} kept)" if rpo is None else f"{rpo}s"
    return [*counts(report),
            f"  RPO at the point       {rpo_text}",
            f"  mismatches             {len(report['mismatches'])}",
            *(f"    {mismatch(m)}" for m in report["mismatches"][:most])]


def drill_stamp() -> str:
    """Unique per drill: scratch names, transactional id and checkpoint never collide."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.urandom(3).hex()}"


async def drill(config: Config, store: Store, keyring: KeyRing, d: Drill, keep: bool,
                progress: Progress | None = None) -> DrillReport:
    """Replay a stream into the drill's scratch target, compare it with the log, report
    RTO/RPO/mismatches and store the report under audit/."""
    plan = d.plan
    report: dict[str, Any] = {"action": "drill", "log_id": config.log_id, "at_ms": _now_ms(),
                              "target": d.target, "until_ms": plan.until_ms,
                              "until_seq": plan.until_seq, **d.report}
    async with d:
        seen: list[StreamFilter] = []
        try:
            result = await replay(config, store, keyring, d.plan, progress, seen.append)
        except (SegmentError, BlobError) as e:
            # The log cannot be restored from: what the drill is there to find. Reported
            # and stored, without an RTO (nothing was rebuilt).
            report.update(ok=False, error=str(e), rto_s=None)
            if not keep:  # what the failed replay wrote so far
                report.update(await d.clean(seen[0] if seen else None))
            return await _finish(store, config, report, d.lines(report))
        except DrstreamError:
            # A runtime failure (the target or the store went away): no finding about the
            # log, so no report is stored; the scratch target is cleaned if it can be.
            if not keep:
                with contextlib.suppress(DrstreamError):
                    await d.clean(seen[0] if seen else None)
            raise
        report["rto_s"] = round(result.seconds, 3)
        check = await d.compare(result.filter)
        newest = result.filter.newest_ms
        point = plan.until_ms if plan.until_ms is not None else await _segment_time(
            store, config.log_id, result.through_seq)
        report.update(
            ok=not check.mismatches, applied_through_seq=result.through_seq,
            records=result.records, **check.fields, mismatches=check.mismatches,
            rpo_at_point_s=None if newest is None or point is None
            else max(0.0, (point - newest) / 1000),
        )
        if not keep:
            report.update(await d.clean(result.filter))
    return await _finish(store, config, report, d.lines(report))


async def _finish(store: Store, config: Config, doc: dict[str, Any],
                  lines: list[str]) -> DrillReport:
    await store_report(store, config.log_id, doc)
    return DrillReport(doc, lines)


async def _segment_time(store: Store, log_id: str, seq: int) -> int | None:
    data = await DeltaLog(store, log_id).fetch(seq) if seq > 0 else None
    return None if data is None else parse_header(data)[0].created_at_ms


def _now_ms() -> int:
    return int(time.time() * 1000)
