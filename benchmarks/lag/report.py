"""The report: tables, observations, plot; lag.json, lag.md and lag.png."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import (
    GiB,
    MiB,
    md_table,
    text_table,
    write_atomic,
)
from benchmarks.lag.base import SYSTEM_LABEL


def fmt(v: Any, fmt: str = ".0f") -> str:
    return "" if v is None else format(v, fmt)


def main_table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = ["case", "system", "records", "MB/s", "records/s", "lag p50 ms", "p95 ms",
               "p99 ms", "max ms", "RPO p50 ms", "RPO p99 ms", "CPU s/GiB", "MB per CPU-s",
               "CPU s/GiB 2nd half",
               "peak RSS MiB", "compression", "store MiB", "store req/min PUT/GET/HEAD/LIST",
               "missing/dup"]
    rows = []
    for r in results:
        lag, st = r["lag_ms"], r.get("store")
        rec = r["records"]
        req = ""
        if st:
            q = st["requests_per_min"]
            req = "/".join(fmt(q.get(op, 0)) for op in ("PUT", "GET", "HEAD", "LIST"))
        rows.append([
            r["case"], SYSTEM_LABEL[r["system"]], f"{rec['produced']:,}",
            fmt(r["sustained"]["mb_per_s"], ".1f"), fmt(r["sustained"]["records_per_s"]),
            fmt(lag["p50"]), fmt(lag["p95"]), fmt(lag["p99"]), fmt(lag["max"]),
            fmt(st["rpo_ms"]["p50"]) if st else "n/a", fmt(st["rpo_ms"]["p99"]) if st else "n/a",
            *([fmt(r["cpu_s_per_gib"], ".1f"), fmt(r["mb_per_cpu_s"], ".1f"),
               fmt((r.get("second_half") or {}).get("cpu_s_per_gib"), ".1f")]
              if r["cpu_window"]["payload_bytes"] >= 10e6 else ["(idle)"] * 3),
            fmt(r["peak_rss_total_bytes"] / MiB),
            fmt(st["compression_ratio"], ".2f") if st else "n/a (none)",
            fmt(st["bytes_written"] / MiB, ".1f") if st else "n/a",
            req or "n/a", f"{rec['missing']}/{r['duplicates']}",
        ])
    return headers, rows


def breakdown_table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    stages = [("produce_to_cut", "produce -> segment cut"), ("cut_to_stored", "cut -> stored"),
              ("stored_to_durable", "stored -> durable"),
              ("durable_to_fetched", "durable -> apply fetched"),
              ("fetched_to_arrived", "fetched -> on the standby")]
    headers = ["case", *[f"{label} p50/p99 ms" for _, label in stages], "e2e p50/p99 ms"]
    rows = []
    for r in results:
        b = (r.get("store") or {}).get("lag_breakdown_ms")
        if not b:
            continue
        rows.append([r["case"], *[f"{fmt(b[k]['p50'])}/{fmt(b[k]['p99'])}" for k, _ in stages],
                     f"{fmt(r['lag_ms']['p50'])}/{fmt(r['lag_ms']['p99'])}"])
    return headers, rows


def store_cost_table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = ["case", "store", "PUT/min (ship)", "GET/min (apply)", "HEAD/min", "LIST/min",
               "segments", "S3 requests $/month"]
    rows = []
    for r in results:
        st = r.get("store")
        if not st:
            continue
        q = st["requests_per_min"]
        rows.append([r["case"], st["type"], *(fmt(q.get(op, 0), ".1f")
                                             for op in ("PUT", "GET", "HEAD", "LIST")),
                     st["segments"], fmt(st.get("s3_request_usd_per_month"), ",.2f")])
    return headers, rows


def freshness_table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = ["case", "system", "freshness signal", "signals/min", "max gap s",
               "signal age p50 ms", "records", "record lag max ms", "CPU s/min",
               "store req/min"]
    rows = []
    for r in results:
        fr = r["freshness"]
        st = r.get("store")
        rows.append([
            r["case"], SYSTEM_LABEL[r["system"]],
            "apply checkpoint (per segment, heartbeats included)" if r["system"] == "drstream"
            else "MM2 heartbeats topic", fmt(fr.get("per_min"), ".1f"),
            fmt(fr.get("max_gap_s"), ".1f"),
            fmt((fr.get("age_on_arrival_ms") or {}).get("p50")),
            r["records"]["produced"], fmt(r["lag_ms"]["max"]), fmt(r["cpu_s_per_min"], ".2f"),
            "/".join(fmt(st["requests_per_min"].get(op, 0)) for op in ("PUT", "GET", "HEAD"))
            if st else "n/a"])
    return headers, rows


def render(report: dict[str, Any]) -> tuple[str, str]:
    m = report["machine"]
    facts = (f"{m['nproc']} CPUs ({m.get('cpu_model')}), "
             f"{(m.get('mem_total_bytes') or 0) / GiB:.0f} GiB RAM, Python {m['python']}, "
             f"Kafka {m.get('kafka')} (brokers and MirrorMaker 2), {m.get('java')}, "
             f"confluent-kafka {m.get('confluent_kafka')} / librdkafka {m.get('librdkafka')}; "
             f"load average {m['loadavg_at_start'][0]:.2f} at start, "
             f"{report['loadavg_at_end'][0]:.2f} at end")
    results = report["results"]
    h, rows = main_table(results)
    md = ["# drstream vs MirrorMaker 2: replication lag", "",
          f"`{report['command']}` ({report['total_s'] / 60:.1f} min, {m['timestamp']})", "",
          facts, "", md_table(h, rows), ""]
    txt = [facts, "", text_table(h, rows), ""]
    bh, brows = breakdown_table(results)
    if brows:
        md += ["Where drstream's lag goes (per record, from the store operations timed inside "
               "ship and apply and the segments' created_at):", "", md_table(bh, brows), ""]
        txt += ["drstream lag breakdown:", text_table(bh, brows), ""]
    ch, crows = store_cost_table(results)
    if crows:
        md += ["drstream's store requests over the load (ship's PUTs, apply's GETs) and what "
               "they would cost a month at S3 Standard request prices ($0.005 per 1,000 PUT "
               "or LIST, $0.0004 per 1,000 GET or HEAD, 730 hours):", "",
               md_table(ch, crows), ""]
        txt += ["store requests and their price:", text_table(ch, crows), ""]
    idle = [r for r in results if r["case"].startswith("idle")]
    if idle:
        fh, frows = freshness_table(idle)
        md += ["Freshness while idle:", "", md_table(fh, frows), ""]
        txt += ["freshness while idle:", text_table(fh, frows), ""]
    md += ["![lag over time](lag.png)", "", "Columns: lag = standby arrival - produce time "
           "(every record, matched by its stamp); RPO = produce -> its segment durable in the "
           "store (drstream only; MM2 has no intermediate store, RPO is its e2e lag); MB/s "
           "and records/s from the first to the last arrival; CPU s/GiB = utime+stime of the "
           "replicator processes (drstream: ship + apply; MM2: its JVM) per GiB of payload "
           "over the load (backlog: from the first arrival); peak RSS = sum over those "
           "processes; compression = payload / stored segment bytes; store requests per "
           "minute of ship + apply over the load.", ""]
    notes = report.get("notes") or []
    if notes:
        md += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
        txt += ["notes:"] + [f"  - {n}" for n in notes]
    return "\n".join(md), "\n".join(txt)


def observations(results: list[dict[str, Any]],
                 failures: list[dict[str, Any]] | None = None) -> list[str]:
    notes = [f"{f['case']}/{SYSTEM_LABEL[f['system']]}: FAILED: {f['error'][:300]}"
             for f in failures or []]
    for r in results:
        tag = f"{r['case']}/{SYSTEM_LABEL[r['system']]}"
        rec = r["records"]
        if rec["missing"] or r["duplicates"] or rec["stamp_mismatch"] or rec["unknown_ids"]:
            notes.append(f"{tag}: {rec['missing']} missing, {r['duplicates']} duplicates, "
                         f"{rec['stamp_mismatch']} stamp mismatches, {rec['unknown_ids']} "
                         f"unknown ids on the standby")
        if not r["caught_up"]:
            notes.append(f"{tag}: NOT caught up within the drain timeout")
        if r.get("drstream_offset_mismatch"):
            notes.append(f"{tag}: {r['drstream_offset_mismatch']} records with a "
                         f"drstream.offset/partition that does not match their id")
        if (r.get("producer_max_behind_s") or 0) > 0.5:
            notes.append(f"{tag}: the load generator fell up to "
                         f"{r['producer_max_behind_s']:.1f}s behind its schedule (CPU bound)")
        bad_stop = {k: v for k, v in r["stop"].items()
                    if v.get("exit_code") not in (0, 143)}
        if bad_stop:
            notes.append(f"{tag}: unclean stop {bad_stop}")
        if r["log_problems"]:
            notes.append(f"{tag}: {len(r['log_problems'])}+ warning/error log lines, first: "
                         f"{r['log_problems'][0][:200]}")
        cores = r["cores"]
        threads = "; ".join(f"{proc}: " + ", ".join(f"{k} {v:.1f}" for k, v in groups.items()
                                                     if v >= 0.1)
                            for proc, groups in (r.get("threads_cpu_s") or {}).items())
        if threads:
            notes.append(f"{tag}: CPU seconds by thread over the whole run: {threads}")
        notes.append(f"{tag}: start-up {r['startup_s']:.1f}s (CPU "
                     f"{sum(r['startup_cpu_s'].values()):.1f}s); during the load cores: "
                     + ", ".join(f"{k.removesuffix('_cores')} {v:.2f}" for k, v in cores.items()
                                 if k.endswith("_cores")))
    return notes


def plot(report: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    results = report["results"]
    cases = list(dict.fromkeys(r["case"] for r in results))
    fig, axes = plt.subplots(len(cases), 1, figsize=(10, 2.8 * len(cases)), squeeze=False)
    colors = {"drstream": "tab:blue", "mm2": "tab:orange"}
    for ax, case in zip(axes[:, 0], cases, strict=True):
        for r in (r for r in results if r["case"] == case):
            tl = r["timeline"]
            if not tl:
                continue
            x = [row[0] for row in tl]
            style = {"marker": "o", "linestyle": "none"} if len(tl) < 10 else {}
            ax.plot(x, [row[3] for row in tl], color=colors[r["system"]],
                    label=f"{SYSTEM_LABEL[r['system']]} p99", **style)
            ax.plot(x, [row[2] for row in tl], color=colors[r["system"]], alpha=0.5,
                    linestyle="--" if not style else "none",
                    marker=style.get("marker"), label=f"{SYSTEM_LABEL[r['system']]} p50")
        ax.set_yscale("log")
        ax.set_title(case, fontsize=10)
        ax.set_ylabel("e2e lag ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("seconds since the load started, records by produce time "
                           "(backlog: since the replicator launched, records by arrival time)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path




def write_report(report: dict[str, Any], out_dir: Path, *, plot_png: bool = True,
                 ) -> list[Path]:
    report["notes"] = observations(report["results"], report.get("failures"))
    md, txt = render(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "lag.json", out_dir / "lag.md"]
    write_atomic(paths[0], json.dumps(report, indent=1, default=str) + "\n")
    write_atomic(paths[1], md + "\n")
    png = plot(report, out_dir / "lag.png") if plot_png else None
    if png is not None:
        paths.append(png)
    print(txt)
    return paths
