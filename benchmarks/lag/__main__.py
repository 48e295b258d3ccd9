"""`python -m benchmarks.lag`: every case (or those named) with every system, then the
report; `_produce`, `_read`, `_daemon` are the entry points of its subprocesses."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from benchmarks import lag
from benchmarks.lag.base import RESULTS_DIR, STORES, SYSTEMS, all_cases, load_case, scaled
from benchmarks.lag.produce import produce_main
from benchmarks.lag.read import read_main
from benchmarks.lag.report import write_report
from benchmarks.lag.run import run_cases
from benchmarks.lag.wrapper import daemon_main


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lag", description=lag.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="all", help="comma-separated case names from "
                    "benchmarks/cases (default: all, in their order)")
    ap.add_argument("--case-file", type=Path, action="append", default=[],
                    help="a case file (repeatable; replaces --cases)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="drstream,mm2 (default both)")
    ap.add_argument("--store", choices=STORES, default=None,
                    help="drstream's store for every case (default: each case's own)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply every phase's seconds and records (e.g. 0.2 for a quick run)")
    ap.add_argument("--primary", help="primary bootstrap servers (default: start clusters)")
    ap.add_argument("--standby", help="standby bootstrap servers")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    ap.add_argument("--keep", action="store_true", help="keep work dirs and cluster data")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="sample drstream ship/apply stacks (every thread, 10 ms) and CPU per "
                         "thread into DIR/<case>-<command>.json; results then go to DIR too "
                         "(profiled numbers are not the benchmark's)")
    args = ap.parse_args(argv)
    if bool(args.primary) != bool(args.standby):
        ap.error("--primary and --standby go together")
    return args


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    entry = {"_produce": produce_main, "_read": read_main, "_daemon": daemon_main}
    if raw[:1] and raw[0] in entry:
        return entry[raw[0]](raw[1:])
    args = parse_args(raw)
    if args.case_file:
        cases = [load_case(p) for p in args.case_file]
    else:
        cases = all_cases()
        if args.cases != "all":
            wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
            known = {c["name"]: c for c in cases}
            missing = [w for w in wanted if w not in known]
            if missing:
                print(f"unknown cases {missing}; known: {sorted(known)}", file=sys.stderr)
                return 2
            cases = [known[w] for w in wanted]
    cases = [scaled(c, args.scale) for c in cases]
    if args.store:
        for c in cases:
            c["store"] = args.store
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if set(systems) - set(SYSTEMS):
        print(f"unknown systems {systems}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = run_cases(cases, systems, primary=args.primary, standby=args.standby,
                       keep=args.keep, profile_dir=args.profile)
    report["command"] = " ".join(["python -m benchmarks.lag", *raw])
    report["params"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report["cases"] = cases
    paths = write_report(report, args.profile or args.out_dir)
    print("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
