"""The `drstream` command line. Every subcommand listed here works; each takes the same config.

Exit codes: 0 success, 1 the command ran and found problems (verify), 2 bad usage or
config, 3 a runtime failure (store down, key missing).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon import __version__
from daemon.config import Config, load_config
from daemon.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    ConfigError,
    ConfigFieldError,
    DrstreamError,
)
from daemon.keyring import KeyRing, generate_key_file, load_key
from daemon.layout import LOGS, after_log, log_id_of
from daemon.logging import configure_logging
from daemon.plugins import Connectors, installed

if TYPE_CHECKING:
    from daemon.replay import ReplayPlan



def run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run the command's coroutine on uvloop (the CLI is the only place that picks a loop)."""
    import uvloop

    return uvloop.run(coro)


def keyring_from_config(config: Config) -> KeyRing:
    keys = {}
    for key_id, ref in config.keyring.keys.items():
        try:
            keys[key_id] = load_key(ref)
        except DrstreamError as e:
            raise ConfigError(
                "keyring", [ConfigFieldError(f"keyring.keys.{key_id}", ref, str(e))]
            ) from e
    return KeyRing(keys, config.keyring.active)


def keyring_from_args(specs: list[str]) -> KeyRing:
    """`--key ID=REF` (repeatable; the first is active)."""
    keys: dict[str, bytes] = {}
    for spec in specs:
        key_id, sep, ref = spec.partition("=")
        if not sep:
            raise ConfigError("--key", [ConfigFieldError("--key", spec, "expected ID=REF")])
        keys[key_id] = load_key(ref)
    return KeyRing(keys, next(iter(keys)))


async def _validate(args: argparse.Namespace, connectors: Connectors) -> int:
    config = load_config(args.config, connectors)
    if args.check_keys:
        keyring_from_config(config)
    print(f"{args.config}: ok (log_id {config.log_id}, store {config.store.type})")
    return EXIT_OK


async def _keys_generate(args: argparse.Namespace, connectors: Connectors) -> int:
    path = Path(args.path)
    generate_key_file(path)
    print(f"wrote a new 256-bit key to {path} (mode 0600)")
    print("reference it in the config as:")
    print(f"  keyring:\n    active: {args.id}\n    keys:\n      {args.id}: file:{path.resolve()}")
    return EXIT_OK


def _progress_printer(total_hint: Callable[[], int | None]) -> Callable[[Any], None]:
    last = [time.monotonic()]  # nothing for the first interval: short runs stay quiet
    interactive = sys.stderr.isatty()

    def show(report: Any) -> None:
        now = time.monotonic()
        if now - last[0] < (0.5 if interactive else 10.0):
            return
        last[0] = now
        total = total_hint()
        of = f"/{total}" if total else ""
        end = "\r" if interactive else "\n"
        print(f"verify {report.log_id}: {report.segments}{of} segments, "
              f"{report.stored_bytes / 2**20:.1f} MiB, {len(report.problems)} problems",
              end=end, file=sys.stderr, flush=True)

    return show


def _print_report(report: Any) -> None:
    status = "OK" if report.ok else "FAILED"
    print(f"log {report.log_id}: {status}")
    print(f"  segments   {report.segments} (seq {report.first_seq}..{report.last_seq}), "
          f"{report.stored_bytes / 2**20:.2f} MiB stored")
    if report.first_created_ms is not None:
        print(f"  written    {_iso(report.first_created_ms)} .. {_iso(report.last_created_ms)}")
    print(f"  key ids    {', '.join(sorted(report.key_ids)) or '-'}")
    if report.deep:
        print(f"  records    {report.records} ({report.heartbeats} heartbeat segments)")
        if report.min_record_ms is not None:
            print(f"  record ts  {_iso(report.min_record_ms)} .. {_iso(report.max_record_ms)}")
        for g in report.source_gaps:
            print(f"  SOURCE GAP {g['stream']} {g['topic']}[{g['partition']}] offsets "
                  f"{g['first']}..{g['end'] - 1} were deleted on the source before they were "
                  f"shipped (recorded in seq {g['seq']})")
        if report.blobs_checked:
            print(f"  blobs      {report.blobs_checked} named by segments, each fetched and "
                  "authenticated")
    for problem in report.problems:
        print(f"  PROBLEM    {problem}")


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


async def _verify(args: argparse.Namespace, connectors: Connectors) -> int:
    from daemon.deltalog import DeltaLog
    from daemon.verify import verify_log

    config = load_config(args.config, connectors) if args.config else None
    if args.url:
        store_config = connectors.store_config_from_url(args.url)
    elif config is not None:
        store_config = config.store
    else:
        raise ConfigError("verify", [ConfigFieldError("URL", None, "give a store URL or --config")])
    keyring = None
    if args.key:
        keyring = keyring_from_args(args.key)
    elif config is not None and args.deep:
        keyring = keyring_from_config(config)
    async with connectors.open_store(store_config) as store:
        log_ids = [args.log_id] if args.log_id else (
            [config.log_id] if config is not None else await _discover_logs(store)
        )
        if not log_ids:
            print(f"no logs under {store.url}", file=sys.stderr)
            return EXIT_PROBLEMS
        reports = []
        for log_id in log_ids:
            report = await verify_log(
                DeltaLog(store, log_id), keyring=keyring, deep=args.deep,
                from_seq=args.from_seq, to_seq=args.to_seq,
                progress=_progress_printer(lambda: None), connectors=connectors,
            )
            reports.append(report)
    if args.json:
        print(json.dumps([r.to_json() for r in reports], indent=2))
    else:
        for report in reports:
            _print_report(report)
    return EXIT_OK if all(r.ok for r in reports) else EXIT_PROBLEMS


async def _discover_logs(store: Any) -> list[str]:
    """Log ids under logs/, one LIST call per log (skip past each log's keys)."""
    ids: list[str] = []
    start_after = None
    while True:
        found = None
        async for key in store.list(LOGS, start_after=start_after, limit=1):
            found = log_id_of(key)
        if found is None:
            return ids
        ids.append(found)
        start_after = after_log(found)


async def _serve(args: argparse.Namespace, connectors: Connectors, role: str) -> int:
    """ship or apply as a service (daemon/service.py) until SIGTERM."""
    from daemon.applier import Applier
    from daemon.pipeline import Shipper
    from daemon.service import Factory, Service

    config = load_config(args.config, connectors)
    configure_logging(config.logging.level, config.logging.format)
    section, factory, need = (("sources", Shipper, "ship needs a source") if role == "ship"
                              else ("sinks", Applier, "apply needs a sink"))
    if not getattr(config, section):
        raise ConfigError(args.config, [ConfigFieldError(section, [], need)])
    keyring = keyring_from_config(config)
    component: Factory = factory
    return await Service(role, args.config, config).run(keyring, component)


async def _status(args: argparse.Namespace, connectors: Connectors) -> int:
    from daemon.ops import status

    config = load_config(args.config, connectors)
    keyring = keyring_from_config(config)
    async with connectors.open_store(config.store) as store:
        report = await status(config, store, keyring)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_status(report)
    return EXIT_OK


def _age(ms: int | None) -> str:
    return "-" if ms is None else f"{_iso(ms)} ({(time.time() * 1000 - ms) / 1000:.1f}s ago)"


def _print_status(r: dict[str, Any]) -> None:
    print(f"log {r['log_id']} at {r['store']}")
    print(f"  durable head   seq {r['durable_head_seq']}, written {_age(r['head_written_at_ms'])}")
    for stream, s in r["streams"].items():
        if s["reachable"]:
            rpo = "unknown (pending changes carry no time)" if s["rpo_s"] is None \
                else f"{s['rpo_s']:.2f}s"
            print(f"  {stream:<14} pending {s['pending_records']} records, "
                  f"ship lag / RPO {rpo}")
        else:
            print(f"  {stream:<14} UNREACHABLE ({s['error']}); RPO <= "
                  f"{s['rpo_s_upper_bound']}s (last heartbeat)")
    for sink, s in r["sinks"].items():
        lag = "-" if s["apply_lag_s"] is None else f"{s['apply_lag_s']:.2f}s"
        print(f"  {sink:<14} applied seq {s['applied_seq']}, "
              f"{s['apply_lag_segments']} segments behind, apply lag {lag}")


async def _failover(args: argparse.Namespace, connectors: Connectors) -> int:
    from daemon.ops import failover

    config = load_config(args.config, connectors)
    configure_logging(config.logging.level, config.logging.format)
    keyring = keyring_from_config(config)
    async with connectors.open_store(config.store) as store:
        report = await failover(config, store, keyring)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"failover of log {report['log_id']}: applied through seq "
              f"{report['applied_seq']} (durable head {report['durable_head_seq']}) "
              f"in {report['drain_s']}s")
        for stream, s in report["streams"].items():
            if s["primary"] == "reachable":
                print(f"  {stream}: RPO {s['rpo_s']:.3f}s, "
                      f"{s['records_not_replicated']} records not replicated")
            else:
                print(f"  {stream}: primary unreachable; last heartbeat "
                      f"{_age(s['last_heartbeat_ms'])}; RPO <= {s['rpo_s_upper_bound']}s")
        for sink, groups in report["groups_committed"].items():
            print(f"  {sink}: group offsets committed for {sorted(groups) or 'no groups'}")
        print(f"  audit record: {report['audit_object']}")
    return EXIT_OK


def _log_config(args: argparse.Namespace, connectors: Connectors) -> Config:
    """--config, or --store URL + --log-id + --key (replaying a log without its config)."""
    from daemon.config import parse_config

    if args.config:
        return load_config(args.config, connectors)
    missing = [f for f, v in (("--store", args.store), ("--log-id", args.log_id),
                              ("--key", args.key)) if not v]
    if missing:
        raise ConfigError("arguments", [ConfigFieldError(
            ", ".join(missing), None, "give --config, or --store, --log-id and --key")])
    keys = dict(spec.partition("=")[::2] for spec in args.key)
    store = connectors.store_config_from_url(args.store).model_dump()
    return parse_config({"log_id": args.log_id, "store": store,
                         "keyring": {"active": next(iter(keys)), "keys": keys}}, "arguments",
                        connectors)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _plan(args: argparse.Namespace, connectors: Connectors) -> ReplayPlan:
    """The replay plan of the command line: the stream (by default that of the kind whose
    target option is given), and the options of its kind; another kind's options are
    usage errors."""
    from daemon.replay import ReplayPlan, parse_time_ms

    given = {opt.flag: getattr(args, _dest(opt.flag)) for _, opt in connectors.stream_options()}
    stream = args.stream or _default_stream(connectors, given)
    kind = connectors.stream(stream)
    usage = []
    for owner, opt in connectors.stream_options():
        value = given[opt.flag]
        if owner is kind or not opt.why or value is None or value == opt.default:
            continue
        use = kind.traits.target_option if opt.flag == owner.traits.target_option else None
        why = f"{opt.why}; stream {stream} is {kind.traits.noun}" + (f" (use {use})" if use else "")
        usage.append(ConfigFieldError(opt.flag, value, why))
    if usage:
        raise ConfigError("arguments", usage)
    return ReplayPlan(
        stream=stream, until_ms=parse_time_ms(args.until) if args.until else None,
        until_seq=args.until_seq, name=getattr(args, "name", "replay"), parallel=args.parallel,
        options={opt.flag: given[opt.flag] for opt in kind.options},
        dry_run=getattr(args, "dry_run", False))


def _default_stream(connectors: Connectors, given: dict[str, str | None]) -> str:
    kinds = list(connectors.streams.values())
    chosen = next((k for k in kinds if given.get(k.traits.target_option)),
                  kinds[0] if kinds else None)
    if chosen is None:
        raise ConfigError("arguments", [ConfigFieldError("--stream", None, "no connector "
                                                         "offers streams to replay")])
    return chosen.traits.default_stream


def _replay_progress(unit: str = "records") -> Callable[[int, int, int, int, float], None]:
    interactive = sys.stderr.isatty()

    def show(seq: int, end: int, records: int, nbytes: int, elapsed: float) -> None:
        pct = 100.0 * seq / end if end else 100.0
        rate = nbytes / elapsed / 2**20 if elapsed > 0 else 0.0
        eta = elapsed * (end - seq) / seq if seq else 0.0
        print(f"replay seq {seq}/{end} ({pct:.0f}%), {records} {unit}, "
              f"{nbytes / 2**20:.1f} MiB, {rate:.1f} MiB/s, ETA {eta:.0f}s",
              end="\r" if interactive else "\n", file=sys.stderr, flush=True)

    return show


async def _replay(args: argparse.Namespace, connectors: Connectors) -> int:
    from daemon.replay import replay

    config = _log_config(args, connectors)
    plan = _plan(args, connectors)
    kind = connectors.stream(plan.stream)
    if not plan.dry_run and not plan.option(kind.traits.target_option):
        raise ConfigError("arguments", [ConfigFieldError(
            kind.traits.target_option, None,
            f"name the {kind.traits.target_noun} to write to, or use --dry-run")])
    keyring = keyring_from_config(config)
    async with connectors.open_store(config.store) as store:
        result = await replay(config, store, keyring, plan, _replay_progress(kind.traits.unit))
    print(file=sys.stderr)
    verb = "would write" if plan.dry_run else "wrote"
    print(f"replay of log {config.log_id} ({plan.stream}) through seq {result.through_seq}: "
          f"{verb} {result.records} {kind.traits.unit} ({result.bytes / 2**20:.2f} MiB) in "
          f"{result.seconds:.1f}s")
    for line in result.filter.lines(plan):
        print(line)
    return EXIT_OK


async def _drill(args: argparse.Namespace, connectors: Connectors) -> int:
    from daemon.replay import drill, drill_stamp

    config = load_config(args.config, connectors)
    plan = _plan(args, connectors)
    kind = connectors.stream(plan.stream)
    keyring = keyring_from_config(config)
    try:
        scratch = kind.drill(plan, config.log_id, config.sinks, drill_stamp())
    except ConfigFieldError as e:
        raise ConfigError(args.config, [e]) from None
    async with connectors.open_store(config.store) as store:
        report = await drill(config, store, keyring, scratch, args.keep,
                             _replay_progress(kind.traits.unit))
    print(file=sys.stderr)
    if args.json:
        print(json.dumps(report.doc, indent=2, default=str))
    else:
        _print_drill(report.doc, report.lines)
    return EXIT_OK if report.ok else EXIT_PROBLEMS


def _print_drill(r: dict[str, Any], lines: list[str]) -> None:
    print(f"drill of log {r['log_id']} into {r['target']}: {'PASSED' if r['ok'] else 'FAILED'}")
    print(f"  RTO (time to rebuild)  {r['rto_s']}s")
    if "error" in r:
        print(f"  error                  {r['error']}")
    for line in lines:
        print(line)
    print(f"  report                 {r['audit_object']}")


async def _prune(args: argparse.Namespace, connectors: Connectors) -> int:
    from daemon.replay import parse_duration_s, prune

    config = load_config(args.config, connectors)
    older = parse_duration_s(args.older_than)
    async with connectors.open_store(config.store) as store:
        r = await prune(config, store, older, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    span = f"seq {r.deleted[0]}..{r.deleted[-1]}" if r.deleted else "nothing"
    print(f"prune of log {config.log_id}: {verb} {len(r.deleted)} segments ({span}); "
          f"kept from seq {r.deleted[-1] + 1 if r.deleted else r.first_seq}: {r.kept_reason}")
    if r.locked:
        print(f"  under Object Lock, not deleted: seq {r.locked[0]} and later")
    return EXIT_OK


def _add_replay_args(p: argparse.ArgumentParser, connectors: Connectors) -> None:
    p.add_argument("--until", metavar="TIME",
                   help="RFC 3339: Kafka records with timestamps up to it; registry events "
                   "carry no time of their own, so for mlflow: streams the events of the "
                   "segments written (when the change was observed) at or before it")
    p.add_argument("--until-seq", type=int, metavar="N", help="segments up to N (inclusive)")
    p.add_argument("--parallel", type=int, default=4, metavar="N",
                   help="segment fetches in flight (applied in order)")
    kinds = list(connectors.streams.values())
    default = ", or ".join([k.traits.default_stream for k in kinds[:1]] + [
        f"{k.traits.default_stream} with {k.traits.target_option}" for k in kinds[1:]])
    p.add_argument("--stream", default=None,
                   help=f"stream in the log to replay (default {default})")
    for _, opt in connectors.stream_options():
        p.add_argument(opt.flag, metavar=opt.metavar, help=opt.help)


Handler = Callable[[argparse.Namespace, Connectors], Coroutine[Any, Any, int]]
HANDLERS: dict[str, Handler] = {
    "validate": _validate, "keys generate": _keys_generate, "verify": _verify,
    "ship": functools.partial(_serve, role="ship"),
    "apply": functools.partial(_serve, role="apply"), "status": _status, "failover": _failover,
    "replay": _replay, "drill": _drill, "prune": _prune,
}


def build_parser(connectors: Connectors) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drstream",
        description="Disaster-recovery replication through an encrypted, hash-chained delta log.",
    )
    parser.add_argument("--version", action="version", version=f"drstream {__version__}")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a config file; exit 2 with every error found")
    p.add_argument("config", help="path of the YAML config")
    p.add_argument("--check-keys", action="store_true",
                   help="also load every key of the key ring (file modes, sizes)")
    p.set_defaults(handler="validate")

    keys = sub.add_parser("keys", help="manage encryption keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    p = keys_sub.add_parser("generate", help="write a new random 256-bit key file (mode 0600)")
    p.add_argument("path", help="where to write the key; an existing file is never overwritten")
    p.add_argument("--id", default="k1", help="key id to show in the config snippet")
    p.set_defaults(handler="keys generate")

    p = sub.add_parser("verify", help="walk a log's hash chain; --deep also checks every MAC")
    p.add_argument("url", nargs="?", help="store URL (file:///path, s3://bucket/prefix)")
    p.add_argument("--config", help="take store, log_id and keys from this config")
    p.add_argument("--log-id", help="verify only this log (default: every log in the store)")
    p.add_argument("--key", action="append", default=[], metavar="ID=REF",
                   help="a key for --deep, e.g. k1=file:/etc/drstream/k1.key (repeatable)")
    p.add_argument("--deep", action="store_true", help="decrypt and decode every segment")
    p.add_argument("--from-seq", type=int, default=1, metavar="N")
    p.add_argument("--to-seq", type=int, default=None, metavar="N")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(handler="verify")

    p = sub.add_parser("ship", help="tail the configured sources into the delta log until SIGTERM")
    p.add_argument("--config", required=True, help="path of the YAML config")
    p.set_defaults(handler="ship")

    p = sub.add_parser("apply", help="follow the delta log into the standby sinks until SIGTERM")
    p.add_argument("--config", required=True, help="path of the YAML config")
    p.set_defaults(handler="apply")

    p = sub.add_parser("status", help="ship lag, durable head, applied seq, apply lag, RPO")
    p.add_argument("--config", required=True, help="path of the YAML config")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler="status")

    p = sub.add_parser("failover", help="apply every durable segment, sync consumer-group "
                       "offsets, report and record the final RPO")
    p.add_argument("--config", required=True, help="path of the YAML config")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler="failover")

    p = sub.add_parser("replay", help="rebuild topics or a model registry from the log up "
                       "to a time or seq; resumable, with progress")
    p.add_argument("--config", help="take store, log_id and keys from this config")
    p.add_argument("--store", metavar="URL", help="or: the store URL (file://, s3://)")
    p.add_argument("--log-id", help="with --store: the log to replay")
    p.add_argument("--key", action="append", default=[], metavar="ID=REF",
                   help="with --store: a key (repeatable), e.g. k1=file:/etc/drstream/k1.key")
    _add_replay_args(p, connectors)
    p.add_argument("--name", default="replay",
                   help="names this replay's checkpoint: rerun with the same name to resume")
    p.add_argument("--dry-run", action="store_true", help="report what would be written")
    p.set_defaults(handler="replay")

    p = sub.add_parser("drill", help="replay into scratch topics (or a scratch registry "
                       "with --target-mlflow), compare with the log, report RTO/RPO; exit 1 on "
                       "any mismatch")
    p.add_argument("--config", required=True, help="path of the YAML config")
    _add_replay_args(p, connectors)
    p.add_argument("--keep", action="store_true",
                   help="keep the scratch topics (or the models in the scratch registry)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler="drill")

    p = sub.add_parser("prune", help="delete old segments no reader still needs")
    p.add_argument("--config", required=True, help="path of the YAML config")
    p.add_argument("--older-than", required=True, metavar="DURATION",
                   help="e.g. 7d, 12h: only segments written before now minus this")
    p.add_argument("--dry-run", action="store_true", help="report, delete nothing")
    p.set_defaults(handler="prune")
    return parser


def main(argv: list[str] | None = None, connectors: Connectors | None = None) -> int:
    """The command line; `connectors` default to the installed ones (entry points)."""
    connectors = connectors if connectors is not None else installed()
    args = build_parser(connectors).parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        code: int = run_async(HANDLERS[args.handler](args, connectors))
    except ConfigError as e:
        print(f"drstream: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigFieldError as e:
        print(f"drstream: invalid argument: {e}", file=sys.stderr)
        return EXIT_USAGE
    except DrstreamError as e:
        print(f"drstream: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("drstream: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
