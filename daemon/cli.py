"""The `drstream` command line. Every subcommand listed here works; each takes the same config.

Exit codes: 0 success, 1 the command ran and found problems (verify), 2 bad usage or
config, 3 a runtime failure (store down, key missing).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from drstream.daemon import __version__, render
from drstream.daemon.config import Config, load_config
from drstream.daemon.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    ConfigError,
    ConfigFieldError,
    DrstreamError,
)
from drstream.daemon.keyring import KeyRing, generate_key_file, load_key
from drstream.daemon.layout import LOGS, after_log, log_id_of
from drstream.daemon.logging import configure_logging
from drstream.daemon.plan import ReplayPlan, parse_duration_s, parse_time_ms
from drstream.daemon.plugins import Connectors, installed
from drstream.daemon.store import Store


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run the command's coroutine on uvloop (the CLI is the only place that picks a loop)."""
    import uvloop

    return uvloop.run(coro)


def keyring_from_config(config: Config) -> KeyRing:
    """Every key of the config's key ring; a key that cannot be loaded is a config error
    naming its field."""
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
    refs: dict[str, str] = {}
    for spec in specs:
        key_id, sep, ref = spec.partition("=")
        if not sep:
            raise ConfigError("--key", [ConfigFieldError("--key", spec, "expected ID=REF")])
        refs[key_id] = ref
    return KeyRing.from_refs(refs, next(iter(refs)))


def _emit(lines: list[str]) -> None:
    for line in lines:
        print(line)


def _emit_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, default=str))


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


async def _verify(args: argparse.Namespace, connectors: Connectors) -> int:
    from drstream.daemon.deltalog import DeltaLog
    from drstream.daemon.verify import verify_log

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
        reports = [await verify_log(DeltaLog(store, log_id), keyring=keyring, deep=args.deep,
                                    from_seq=args.from_seq, to_seq=args.to_seq,
                                    progress=render.verify_progress(), connectors=connectors)
                   for log_id in log_ids]
    if args.json:
        print(json.dumps([r.to_json() for r in reports], indent=2))
    else:
        _emit([line for r in reports for line in render.verify(r)])
    return EXIT_OK if all(r.ok for r in reports) else EXIT_PROBLEMS


async def _discover_logs(store: Store) -> list[str]:
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
    from drstream.daemon.applier import Applier
    from drstream.daemon.pipeline import Shipper
    from drstream.daemon.service import Factory, Service

    config = load_config(args.config, connectors)
    configure_logging(config.logging.level, config.logging.format)
    section, factory, need = (
        ("sources", Shipper, "ship needs a source") if role == "ship"
        else ("sinks", functools.partial(Applier, tip_channel=True), "apply needs a sink"))
    if not getattr(config, section):
        raise ConfigError(args.config, [ConfigFieldError(section, [], need)])
    keyring = keyring_from_config(config)
    component: Factory = factory
    return await Service(role, args.config, config).run(keyring, component)


async def _status(args: argparse.Namespace, connectors: Connectors) -> int:
    from drstream.daemon.status import status

    config = load_config(args.config, connectors)
    keyring = keyring_from_config(config)
    async with connectors.open_store(config.store) as store:
        report = await status(config, store, keyring)
    if args.json:
        _emit_json(report.to_json())
    else:
        _emit(render.status(report))
    return EXIT_OK


async def _failover(args: argparse.Namespace, connectors: Connectors) -> int:
    from drstream.daemon.status import failover

    config = load_config(args.config, connectors)
    configure_logging(config.logging.level, config.logging.format)
    keyring = keyring_from_config(config)
    async with connectors.open_store(config.store) as store:
        report = await failover(config, store, keyring)
    if args.json:
        _emit_json(report.to_json())
    else:
        _emit(render.failover(report))
    return EXIT_OK


def _log_config(args: argparse.Namespace, connectors: Connectors) -> Config:
    """--config, or --store URL + --log-id + --key (replaying a log without its config)."""
    from drstream.daemon.config import parse_config

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


async def _replay(args: argparse.Namespace, connectors: Connectors) -> int:
    from drstream.daemon.replay import replay

    config = _log_config(args, connectors)
    plan = _plan(args, connectors)
    kind = connectors.stream(plan.stream)
    if not plan.dry_run and not plan.option(kind.traits.target_option):
        raise ConfigError("arguments", [ConfigFieldError(
            kind.traits.target_option, None,
            f"name the {kind.traits.target_noun} to write to, or use --dry-run")])
    keyring = keyring_from_config(config)
    async with connectors.open_store(config.store) as store:
        result = await replay(config, store, keyring, plan,
                              render.replay_progress(kind.traits.unit))
    print(file=sys.stderr)
    _emit(render.replay(config.log_id, plan, kind, result))
    return EXIT_OK


async def _drill(args: argparse.Namespace, connectors: Connectors) -> int:
    from drstream.daemon.drill import drill, drill_stamp

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
                             render.replay_progress(kind.traits.unit))
    print(file=sys.stderr)
    if args.json:
        _emit_json(report.doc)
    else:
        _emit(render.drill(report))
    return EXIT_OK if report.ok else EXIT_PROBLEMS


async def _prune(args: argparse.Namespace, connectors: Connectors) -> int:
    from drstream.daemon.prune import prune

    config = load_config(args.config, connectors)
    older = parse_duration_s(args.older_than)
    async with connectors.open_store(config.store) as store:
        result = await prune(config, store, older, dry_run=args.dry_run)
    _emit(render.prune(config.log_id, result, args.dry_run))
    return EXIT_OK


def _add_replay_args(p: argparse.ArgumentParser, connectors: Connectors,
                     stream_options: bool) -> None:
    p.add_argument("--until", metavar="TIME",
                   help="RFC 3339: Kafka records with timestamps up to it; registry events "
                   "carry no time of their own, so for mlflow: streams the events of the "
                   "segments written (when the change was observed) at or before it")
    p.add_argument("--until-seq", type=int, metavar="N", help="segments up to N (inclusive)")
    p.add_argument("--parallel", type=int, default=4, metavar="N",
                   help="segment fetches in flight (applied in order)")
    if not stream_options:
        return
    kinds = list(connectors.streams.values())
    default = ", or ".join([k.traits.default_stream for k in kinds[:1]] + [
        f"{k.traits.default_stream} with {k.traits.target_option}" for k in kinds[1:]])
    p.add_argument("--stream", default=None,
                   help=f"stream in the log to replay (default {default})")
    for _, opt in connectors.stream_options():
        p.add_argument(opt.flag, metavar=opt.metavar, help=opt.help)


STREAM_COMMANDS = ("replay", "drill")
Handler = Callable[[argparse.Namespace, Connectors], Coroutine[Any, Any, int]]
HANDLERS: dict[str, Handler] = {
    "validate": _validate, "keys generate": _keys_generate, "verify": _verify,
    "ship": functools.partial(_serve, role="ship"),
    "apply": functools.partial(_serve, role="apply"), "status": _status, "failover": _failover,
    "replay": _replay, "drill": _drill, "prune": _prune,
}


def build_parser(connectors: Connectors, *, stream_options: bool = True
                 ) -> argparse.ArgumentParser:
    """The parser; without `stream_options`, replay and drill lack the options of each
    stream kind (those import every connector)."""
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
    _add_replay_args(p, connectors, stream_options)
    p.add_argument("--name", default="replay",
                   help="names this replay's checkpoint: rerun with the same name to resume")
    p.add_argument("--dry-run", action="store_true", help="report what would be written")
    p.set_defaults(handler="replay")

    p = sub.add_parser("drill", help="replay into scratch topics (or a scratch registry "
                       "with --target-mlflow), compare with the log, report RTO/RPO; exit 1 on "
                       "any mismatch")
    p.add_argument("--config", required=True, help="path of the YAML config")
    _add_replay_args(p, connectors, stream_options)
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
    words = sys.argv[1:] if argv is None else argv
    # Only replay and drill take every stream kind's options: other commands (ship,
    # apply) then import just the connectors their config names.
    streams = any(w in STREAM_COMMANDS for w in words)
    args = build_parser(connectors, stream_options=streams).parse_args(argv)
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
