"""What the commands print for a person: one renderer per typed report, each returning
its lines (the CLI prints them; `--json` prints the report's JSON instead)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from drstream.daemon.bench import BenchReport
from drstream.daemon.drill import DrillReport
from drstream.daemon.plan import ReplayPlan
from drstream.daemon.plugins import StreamKind
from drstream.daemon.prune import PruneResult
from drstream.daemon.replay import Progress, ReplayResult
from drstream.daemon.reshard import ChangeReport
from drstream.daemon.status import FailoverReport, SetStatus, StatusReport
from drstream.daemon.truncate import TruncateResult
from drstream.daemon.verify import Report


def iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def age(ms: int | None) -> str:
    return "-" if ms is None else f"{iso(ms)} ({(time.time() * 1000 - ms) / 1000:.1f}s ago)"


def seconds(value: float | None, digits: int = 2) -> str:
    """A duration in seconds for a person; None is "unknown", never "Nones"."""
    return "unknown" if value is None else f"{value:.{digits}f}s"


def verify(report: Report) -> list[str]:
    span = (f" (seq {report.first_seq}..{report.last_seq})"
            if report.first_seq is not None and report.last_seq is not None else "")
    out = [f"log {report.log_id}: {'OK' if report.ok else 'FAILED'}",
           f"  segments   {report.segments}{span}, "
           f"{report.stored_bytes / 2**20:.2f} MiB stored"]
    if report.first_created_ms is not None and report.last_created_ms is not None:
        out.append(f"  written    {iso(report.first_created_ms)} .. "
                   f"{iso(report.last_created_ms)}")
    out.append(f"  key ids    {', '.join(sorted(report.key_ids)) or '-'}")
    if report.deep:
        out.append(f"  records    {report.records} ({report.heartbeats} heartbeat segments)")
        if report.min_record_ms is not None and report.max_record_ms is not None:
            out.append(f"  record ts  {iso(report.min_record_ms)} .. "
                       f"{iso(report.max_record_ms)}")
        out += [f"  SOURCE GAP {g['stream']} {g['topic']}[{g['partition']}] offsets "
                f"{g['first']}..{g['end'] - 1} were deleted on the source before they were "
                f"shipped (recorded in seq {g['seq']})" for g in report.source_gaps]
        if report.blobs_checked:
            out.append(f"  blobs      {report.blobs_checked} named by segments, each fetched "
                       "and authenticated")
    return out + _findings(report.problems, report.warnings, width=10)


def status(r: StatusReport) -> list[str]:
    head = ("no segments yet" if r.durable_head_seq is None else
            f"seq {r.durable_head_seq}, written {age(r.head_written_at_ms)}")
    out = [f"log {r.log_id} at {r.store}: {'OK' if r.ok else 'PROBLEMS'}",
           f"  durable head   {head}"]
    out += [_stream_status(stream, s) for stream, s in r.streams.items()]
    for sink, s in r.sinks.items():
        if not s["reachable"]:
            out.append(f"  {sink:<14} UNREACHABLE ({s['error']})")
            continue
        behind = "-" if s["apply_lag_segments"] is None else s["apply_lag_segments"]
        lag = "-" if s["apply_lag_s"] is None else seconds(s["apply_lag_s"])
        out.append(f"  {sink:<14} applied seq {s['applied_seq']}, "
                   f"{behind} segments behind, apply lag {lag}")
    if r.in_flight_seqs:
        out.append(f"  in flight      seqs {r.in_flight_seqs} stored after the head (uploads "
                   "not yet durable)")
    return out + _findings(r.problems, r.warnings, width=14)


def _findings(problems: Sequence[object], warnings: Sequence[str], *, width: int
              ) -> list[str]:
    """A report's closing PROBLEM and WARNING lines, their text at column `width` + 3."""
    return ([f"  {'PROBLEM':<{width}} {p}" for p in problems]
            + [f"  {'WARNING':<{width}} {w}" for w in warnings])


def shards_change(r: ChangeReport) -> list[str]:
    out = [f"set {r.log_id}: {r.old_count} -> {r.new_count} shards"]
    out += [f"  sealed   {log_id} at seq {seq}" for log_id, seq in r.sealed.items()]
    out += [f"  started  {log_id}: {len(parts)} partitions" for log_id, parts in r.started.items()]
    out.append(f"  audit record: {r.audit_object}")
    out.append(f"next: set shards.count: {r.new_count} in the config, start its ship and apply "
               "shards; keep the old apply shards running until each applied its seal")
    return out


def status_set(r: SetStatus) -> list[str]:
    out = [line for report in r.shards.values() for line in status(report)]
    failing = ", ".join(f"{label} (log {r.shards[label].log_id})" for label in r.failing)
    out.append(f"set {r.log_id} of {len(r.shards)} shards: "
               f"{'OK' if r.ok else 'PROBLEMS in ' + failing}; worst RPO "
               f"{seconds(r.worst('streams', 'rpo_s'))}, worst apply lag "
               f"{seconds(r.worst('sinks', 'apply_lag_s'))}")
    return out


def _stream_status(stream: str, s: dict[str, Any]) -> str:
    if not s["reachable"]:
        return (f"  {stream:<14} UNREACHABLE ({s['error']}); RPO <= "
                f"{seconds(s['rpo_s_upper_bound'], 1)} (since the last segment)")
    rpo = "unknown (pending changes carry no time)" if s["rpo_s"] is None \
        else seconds(s["rpo_s"])
    return f"  {stream:<14} pending {s['pending_records']} records, ship lag / RPO {rpo}"


def failover(r: FailoverReport) -> list[str]:
    out = [f"failover of log {r.log_id}: applied through seq {r.applied_seq} (durable head "
           f"{r.durable_head_seq}) in {r.drain_s}s"]
    for stream, s in r.streams.items():
        if s["primary"] == "reachable":
            out.append(f"  {stream}: RPO {s['rpo_s']:.3f}s, "
                       f"{s['records_not_replicated']} records not replicated")
        else:
            out.append(f"  {stream}: primary unreachable; last heartbeat "
                       f"{age(s['last_heartbeat_ms'])}; RPO <= "
                       f"{seconds(s['rpo_s_upper_bound'], 1)}")
    for sink, groups in r.groups_committed.items():
        out.append(f"  {sink}: group offsets committed for {sorted(groups) or 'no groups'}")
    out.append(f"  audit record: {r.audit_object}")
    return out


def replay(log_id: str, plan: ReplayPlan, kind: StreamKind, r: ReplayResult) -> list[str]:
    verb = "would write" if plan.dry_run else "wrote"
    return [f"replay of log {log_id} ({plan.stream}) through seq {r.through_seq}: {verb} "
            f"{r.records} {kind.traits.unit} ({r.bytes / 2**20:.2f} MiB) in {r.seconds:.1f}s",
            *r.filter.lines(plan)]


def drill(report: DrillReport) -> list[str]:
    r = report.doc
    out = [f"drill of log {r['log_id']} into {r['target']}: "
           f"{'PASSED' if r['ok'] else 'FAILED'}",
           f"  RTO (time to rebuild)  {seconds(r['rto_s'], 3)}"]
    if "error" in r:
        out.append(f"  error                  {r['error']}")
    return [*out, *report.lines, f"  report                 {r['audit_object']}"]


def prune(log_id: str, r: PruneResult, dry_run: bool) -> list[str]:
    verb = "would delete" if dry_run else "deleted"
    span = f"seq {r.deleted[0]}..{r.deleted[-1]}" if r.deleted else "nothing"
    out = [f"prune of log {log_id}: {verb} {len(r.deleted)} segments ({span}); kept from seq "
           f"{r.deleted[-1] + 1 if r.deleted else r.first_seq}: {r.kept_reason}"]
    if r.locked:
        out.append(f"  under Object Lock until {iso(r.locked_until_ms or 0)}, not deleted: "
                   f"seq {r.locked[0]} and later")
    for name, seq in sorted(r.replays.items()):
        out.append(f"  replay {name!r} is unfinished and needs seq {seq} on: kept")
    if r.blobs is not None:
        b = r.blobs
        out.append(f"  blobs: {b.stored} stored, {b.needed} still named; {verb} "
                   f"{len(b.deleted)} unnamed ones older than {b.grace_s:g}s; {b.fresh} "
                   "unnamed but fresh kept (a running ship may name them soon)")
    if r.audit_object:
        out.append(f"  audit record: {r.audit_object}")
    return out


def truncate(r: TruncateResult, dry_run: bool) -> list[str]:
    verb = "would remove" if dry_run else "removed"
    out = [f"log {r.log_id}: {verb} {len(r.removed)} segments after seq {r.after_seq}"]
    out += [f"  {x['key']}" + (" (hidden behind a delete marker)" if x["hidden"] else
                               f" sha256 {x['sha256']}") for x in r.removed]
    if r.audit_object:
        out.append(f"  audit record: {r.audit_object}")
    return out


def bench(report: BenchReport) -> list[str]:
    r = report.doc
    rec, lag, rpo = r["records"], r["lag_ms"], r["rpo_ms"]

    def pcts(s: dict[str, Any]) -> str:
        if not s["count"]:
            return "-"
        return f"p50 {s['p50']} ms, p95 {s['p95']} ms, p99 {s['p99']} ms, max {s['max']} ms"

    state = "INTERRUPTED" if r.get("interrupted") else ("OK" if r["ok"] else "PROBLEMS")
    return [f"bench of log {r['log_id']} ({r['stream']}): {state}",
            f"  through      {r['target']}",
            f"  load         {rec['produced']:,} records in {r['load_s']:.1f}s "
            f"({r['records_per_s']} records/s, {r['spec']['record_bytes']} bytes each)",
            f"  arrived      {rec['arrived']:,}; missing {rec['missing']}, duplicates "
            f"{rec['duplicates']}, unknown {rec['unknown']}, failed to produce {rec['failed']}",
            f"  lag          {pcts(lag)} (produce on the primary -> read on the standby)",
            f"  RPO          {pcts(rpo)} (produce -> in a durable segment; "
            f"{r['rpo_unseen_records']} records not seen in one)",
            f"  removed      {', '.join(r['removed']) or 'nothing'}"]


def bench_progress() -> Callable[[str], None]:
    return _throttled(lambda interactive: 1.0 if interactive else 5.0)


def _throttled(interval: Callable[[bool], float]) -> Callable[[str], None]:
    """Print progress lines to stderr at most every interval(interactive) seconds,
    overwriting the line on a terminal; nothing for the first interval."""
    last = [time.monotonic()]
    interactive = sys.stderr.isatty()

    def show(line: str) -> None:
        now = time.monotonic()
        if now - last[0] < interval(interactive):
            return
        last[0] = now
        print(line, end="\r" if interactive else "\n", file=sys.stderr, flush=True)

    return show


def verify_progress() -> Callable[[Report], None]:
    show = _throttled(lambda interactive: 0.5 if interactive else 10.0)
    return lambda r: show(f"verify {r.log_id}: {r.segments} segments, "
                          f"{r.stored_bytes / 2**20:.1f} MiB, {len(r.problems)} problems")


def replay_progress(unit: str) -> Progress:
    show = _throttled(lambda _: 0.0)

    def line(seq: int, end: int, records: int, nbytes: int, elapsed: float) -> None:
        seq, end = max(seq, 0), max(end, 0)
        pct = 100.0 * seq / end if end else 100.0
        rate = nbytes / elapsed / 2**20 if elapsed > 0 else 0.0
        eta = elapsed * (end - seq) / seq if seq else 0.0
        show(f"replay seq {seq}/{end} ({pct:.0f}%), {records} {unit}, "
             f"{nbytes / 2**20:.1f} MiB, {rate:.1f} MiB/s, ETA {eta:.0f}s")

    return line
