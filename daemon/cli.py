"""The `drstream` command line. Every subcommand listed here works; each takes the same config.

Exit codes: 0 success, 1 the command ran and found problems (verify, drill, status), 2
bad usage or config (one line per bad option or field, naming it and its value; secrets
never shown), 3 a runtime failure (names the service or object: store down, key
missing, a cluster that does not answer). Nothing ends in a traceback, and a command
that fails creates and deletes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from drstream.daemon import __version__, render
from drstream.daemon.config import Config, load_config, parse_config
from drstream.daemon.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    HIDDEN,
    MISSING,
    ConfigError,
    ConfigFieldError,
    DrstreamError,
)
from drstream.daemon.keyring import KEY_ID_RE, KeyRing, generate_key_file, load_key
from drstream.daemon.layout import LOGS, after_log, log_id_of
from drstream.daemon.logging import configure_logging, get_logger, json_mode, pin
from drstream.daemon.plan import ReplayPlan, parse_assignments, parse_duration_s, parse_time_ms
from drstream.daemon.plugins import (
    BenchFactory,
    BenchSpec,
    ConnectorConfig,
    Connectors,
    installed,
)
from drstream.daemon.secrets import CREDENTIAL_NAME, SecretError, check_file, is_secret_ref
from drstream.daemon.shards import MAX_SHARDS, parse_shard
from drstream.daemon.store import Store

# replay --parallel: segment fetches in flight (apply.prefetch takes the same range)
MAX_PARALLEL = 64


def run_async(coro: Coroutine[Any, Any, int], *, interruptible: bool = True) -> int:
    """Run the command's coroutine on uvloop (the CLI is the only place that picks a loop).

    An interruptible command (every one but ship and apply, which drain on a signal)
    ends at once on SIGINT or SIGTERM: its client threads may be blocked in a
    connect or metadata call for up to its timeout, and waiting them out made Ctrl-C
    take 8-28 s. Ending without them is safe: every write drstream makes is atomic (a
    store object, a Kafka transaction), exactly as after kill -9."""
    import uvloop

    async def main() -> int:
        if interruptible:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, _interrupted, sig)
        get_logger("drstream").debug("command_started", interruptible=interruptible)
        return await coro

    return uvloop.run(main())


def _interrupted(sig: signal.Signals) -> None:
    _report_failure(128 + sig, f"interrupted by {sig.name}")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + sig)


# -- secrets from the command line --------------------------------------------------------


def _refs(values: list[str] | None, option: str, name_re: str) -> dict[str, str]:
    """`NAME=REF` arguments (--key, --credential): each REF must be a secret reference.
    Nothing that might be a secret is ever echoed."""
    refs = parse_assignments(values, option, name_re=name_re, secret=True)
    for name, ref in refs.items():
        if not is_secret_ref(ref):
            raise ConfigFieldError(f"{option} {name}", HIDDEN, "must be a secret reference: "
                                   "env:NAME, file:/absolute/path or credential:NAME")
    return refs


def _key_refs(args: argparse.Namespace) -> dict[str, str]:
    return _refs(getattr(args, "key", None), "--key", KEY_ID_RE.pattern)


def _credential_refs(args: argparse.Namespace) -> dict[str, str]:
    return _refs(getattr(args, "credential", None), "--credential", CREDENTIAL_NAME)


def _config(args: argparse.Namespace, connectors: Connectors) -> Config:
    """--config, with --key / --credential overriding the references it names and --shard
    selecting a shard of a log set; its logging section takes effect (the command line's
    --log-* win)."""
    config = load_config(args.config, connectors, keys=_key_refs(args),
                         credentials=_credential_refs(args))
    config = select_shard(config, getattr(args, "shard", None))
    configure_logging(config.logging.level, config.logging.format)
    return config


def select_shard(config: Config, value: str | None) -> Config:
    """The config with --shard K (or K/N, which also sets the count) as shards.index."""
    if value is None:
        return config
    try:
        index, count = parse_shard(value)
    except ValueError as e:
        raise ConfigFieldError("--shard", value, str(e)) from None
    count = count if count is not None else config.shards.count
    if index >= count:
        raise ConfigFieldError("--shard", value, f"the set has {count} shards (shards.count): "
                               f"K is 0 .. {count - 1}")
    out = config.model_copy(update={"shards": config.shards.model_copy(
        update={"index": index, "count": count})})
    out._connectors = config.connectors
    return out


def _one_shard(config: Config, role: str) -> Config:
    """ship and apply run one shard of a set: the selected one's config."""
    if config.shards.count > 1 and config.shards.index is None:
        raise ConfigFieldError("--shard", MISSING, f"shards.count is {config.shards.count}: "
                               f"{role} runs one shard, give --shard K (0 .. "
                               f"{config.shards.count - 1}) or shards.index")
    return config.for_shard(config.shards.index or 0)


def each_shard(config: Config) -> list[Config]:
    """The configs of the shards a command over a log set works on (--shard narrows)."""
    return [config.for_shard(k) for k in config.shard_indexes()]


def stream_shards(config: Config, stream: str) -> list[Config]:
    """The shards whose logs hold `stream`: a partitioned stream is in every shard's log,
    any other (a model registry) in shard 0's only."""
    source = config.connectors.source_named(stream.split(":", 1)[0])
    if config.shards.count == 1 or (source is not None and source.sharded):
        return each_shard(config)
    if 0 not in config.shard_indexes():
        raise ConfigFieldError("--shard", config.shards.index, f"stream {stream} is shipped "
                               "by shard 0 only (it is not split by partition)")
    return [config.for_shard(0)]


def keyring_from_config(config: Config) -> KeyRing:
    """Every key of the config's key ring; every key that cannot be loaded is reported,
    each as a config error naming its field."""
    return _keyring(config.keyring.keys, config.keyring.active, "keyring.keys.")


def _keyring(refs: dict[str, str], active: str, field: str) -> KeyRing:
    keys, errors = {}, []
    for key_id, ref in refs.items():
        try:
            keys[key_id] = load_key(ref)
        except DrstreamError as e:
            errors.append(ConfigFieldError(f"{field}{key_id}", ref, str(e)))
    if errors:
        raise ConfigError("keyring", errors)
    return KeyRing(keys, active)


# -- output --------------------------------------------------------------------------------


def _emit(lines: list[str]) -> None:
    for line in lines:
        print(line)


def _emit_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, default=str))


def _report_failure(code: int, message: str, fields: list[str] | None = None) -> None:
    """The command's last word on stderr: `drstream: ...` on a terminal, one JSON line in
    JSON mode (every stderr line is then JSON)."""
    if json_mode():
        get_logger("drstream").error("command_failed", exit_code=code, error=message,
                                     **({"errors": fields} if fields else {}))
    else:
        print(f"drstream: {message}", file=sys.stderr)


# -- commands ------------------------------------------------------------------------------


async def _validate(args: argparse.Namespace, connectors: Connectors) -> int:
    config = _config(args, connectors)
    if args.check_keys:
        keyring_from_config(config)
    else:  # what can be checked without reading a key: files exist, owner-only
        errors = []
        for key_id, ref in config.keyring.keys.items():
            try:
                check_file(ref)
            except SecretError as e:
                errors.append(ConfigFieldError(f"keyring.keys.{key_id}", ref, str(e)))
        if errors:
            raise ConfigError(args.config, errors)
    print(f"{args.config}: ok (log_id {config.log_id}, store {config.store.type})")
    if config.shards.count > 1:
        for shard in each_shard(config):
            assert shard.shard is not None
            sources, sinks = [s.stream for s in shard.sources], [s.sink_name for s in shard.sinks]
            print(f"  {shard.shard.label}: log {shard.log_id}, sources {sources}, sinks {sinks}")
    return EXIT_OK


async def _keys_generate(args: argparse.Namespace, connectors: Connectors) -> int:
    if not KEY_ID_RE.fullmatch(args.id):
        raise ConfigFieldError("--id", args.id, f"a key id must match {KEY_ID_RE.pattern}")
    path = Path(args.path)
    if os.path.lexists(path):
        raise ConfigFieldError("PATH", str(path), "exists: a key file is never overwritten")
    generate_key_file(path)
    print(f"wrote a new 256-bit key to {path} (mode 0600)")
    print("reference it in the config as:")
    print(f"  keyring:\n    active: {args.id}\n    keys:\n      {args.id}: file:{path.resolve()}")
    return EXIT_OK


async def _verify(args: argparse.Namespace, connectors: Connectors) -> int:
    from drstream.daemon.deltalog import DeltaLog
    from drstream.daemon.verify import check_readers, verify_log

    if args.from_seq < 1 or (args.to_seq is not None and args.to_seq < args.from_seq):
        raise ConfigFieldError("--from-seq/--to-seq", f"{args.from_seq}..{args.to_seq}",
                               "need 1 <= --from-seq <= --to-seq")
    keys = _key_refs(args)
    config = _config(args, connectors) if args.config else None
    if args.url:
        store_config = connectors.store_config_from_url(args.url)
    elif config is not None:
        store_config = config.store
    else:
        raise ConfigFieldError("URL", MISSING, "give a store URL or --config")
    keyring = None
    if config is not None and (args.deep or keys):
        keyring = keyring_from_config(config)
    elif keys:
        keyring = _keyring(keys, next(iter(keys)), "--key ")
    if args.deep and keyring is None:
        raise ConfigFieldError("--deep", MISSING, "decrypts every segment: give --key ID=REF "
                               "or --config")
    async with connectors.open_store(store_config) as store:
        shards = {c.log_id: c for c in each_shard(config)} if config is not None else {}
        log_ids = [args.log_id] if args.log_id else (
            list(shards) if config is not None else await _discover_logs(store)
        )
        if not log_ids:
            raise ConfigFieldError("URL", store.url, "no logs in this store")
        reports = [await verify_log(DeltaLog(store, log_id), keyring=keyring, deep=args.deep,
                                    from_seq=args.from_seq, to_seq=args.to_seq,
                                    progress=render.verify_progress(), connectors=connectors)
                   for log_id in log_ids]
        if config is not None and args.to_seq is None:
            for report in reports:
                await check_readers(shards.get(report.log_id, config),
                                    DeltaLog(store, report.log_id), report)
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

    whole = _config(args, connectors)
    config = _one_shard(whole, role)
    section, factory, need = (("sources", Shipper, "ship needs a source") if role == "ship"
                              else ("sinks", functools.partial(Applier, tip_channel=True),
                                    "apply needs a sink"))
    _require(config, args.config, section, need)
    keyring = keyring_from_config(config)
    component: Factory = factory

    def select(reloaded: Config) -> Config:  # a reload keeps the shard it runs
        return _one_shard(select_shard(reloaded, args.shard), role)

    return await Service(role, args.config, config, select).run(keyring, component)


def _require(config: Config, path: str, section: str, why: str) -> None:
    if not getattr(config, section):
        raise ConfigError(path, [ConfigFieldError(section, [], why)])


async def _status(args: argparse.Namespace, connectors: Connectors) -> int:
    from drstream.daemon.status import SetStatus, Thresholds, status, status_or_problem

    config = _config(args, connectors)
    for flag, value in (("--max-rpo", args.max_rpo), ("--max-lag", args.max_lag)):
        if value is not None and not 0 <= value < float("inf"):
            raise ConfigFieldError(flag, value, "seconds, 0 or more")
    keyring = keyring_from_config(config)
    thresholds = Thresholds(args.max_rpo, args.max_lag)
    async with connectors.open_store(config.store) as store:
        if config.shards.count == 1:
            report = await status(config, store, keyring, thresholds)
        else:
            shards = {c.shard.label if c.shard else c.log_id:
                      await status_or_problem(c, store, keyring, thresholds)
                      for c in each_shard(config)}
            whole = SetStatus(config.log_id, shards)
            if args.json:
                _emit_json(whole.to_json())
            else:
                _emit(render.status_set(whole))
            return EXIT_OK if whole.ok else EXIT_PROBLEMS
    if args.json:
        _emit_json(report.to_json())
    else:
        _emit(render.status(report))
    return EXIT_OK if report.ok else EXIT_PROBLEMS


async def _failover(args: argparse.Namespace, connectors: Connectors) -> int:
    from drstream.daemon.status import failover

    config = _config(args, connectors)
    _require(config, args.config, "sinks", "failover applies the log to the config's sinks: "
             "use the standby's (apply) config")
    keyring = keyring_from_config(config)
    reports, failed = [], []
    async with connectors.open_store(config.store) as store:
        for shard in each_shard(config):
            try:
                reports.append(await failover(shard, store, keyring))
            except DrstreamError as e:
                if shard.shard is None:
                    raise
                # the other shards fail over all the same: each is a log of its own
                failed.append(f"{shard.shard.label} (log {shard.log_id}): {e}")
    if args.json:
        _emit_json(reports[0].to_json() if config.shards.count == 1
                   else [r.to_json() for r in reports])
    else:
        _emit([line for r in reports for line in render.failover(r)])
    if failed:
        raise DrstreamError("failover did not finish for " + "; ".join(failed))
    return EXIT_OK


def _log_config(args: argparse.Namespace, connectors: Connectors) -> Config:
    """--config, or --store URL + --log-id + --key (replaying a log without its config)."""
    if args.config:
        return _config(args, connectors)
    missing = [f for f, v in (("--store", args.store), ("--log-id", args.log_id),
                              ("--key", args.key)) if not v]
    if missing:
        raise ConfigFieldError(", ".join(missing), MISSING,
                               "give --config, or --store, --log-id and --key")
    keys = _key_refs(args)
    store = connectors.store_config_from_url(args.store).model_dump()
    return parse_config({"log_id": args.log_id, "store": store,
                         "keyring": {"active": next(iter(keys)), "keys": keys}}, "arguments",
                        connectors)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _given(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _plan(args: argparse.Namespace, connectors: Connectors) -> ReplayPlan:
    """The replay plan of the command line: the stream (by default that of the kind whose
    target option is given), and the options of its kind; another kind's options and
    values that cannot work are usage errors, found before anything is read."""
    given = {opt.flag: _given(getattr(args, _dest(opt.flag)))
             for _, opt in connectors.stream_options()}
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
    if not 1 <= args.parallel <= MAX_PARALLEL:
        raise ConfigFieldError("--parallel", args.parallel, f"must be 1 to {MAX_PARALLEL}")
    if args.until_seq is not None and args.until_seq < 1:
        raise ConfigFieldError("--until-seq", args.until_seq, "segments are numbered from 1")
    if args.until is not None and args.until_seq is not None:
        raise ConfigFieldError("--until/--until-seq", f"{args.until} / {args.until_seq}",
                               "give one point, a time or a seq")
    plan = ReplayPlan(
        stream=stream, until_ms=parse_time_ms(args.until) if args.until else None,
        until_seq=args.until_seq, name=getattr(args, "name", "replay"), parallel=args.parallel,
        options={opt.flag: given[opt.flag] for opt in kind.options},
        dry_run=getattr(args, "dry_run", False))
    kind.check(plan)
    return plan


def _default_stream(connectors: Connectors, given: dict[str, Any]) -> str:
    kinds = list(connectors.streams.values())
    chosen = next((k for k in kinds if given.get(k.traits.target_option)),
                  kinds[0] if kinds else None)
    if chosen is None:
        raise ConfigFieldError("--stream", MISSING, "no connector offers streams to replay")
    return chosen.traits.default_stream


async def _replay(args: argparse.Namespace, connectors: Connectors) -> int:
    from drstream.daemon.replay import check_log, replay

    config = _log_config(args, connectors)
    plan = _plan(args, connectors)
    kind = connectors.stream(plan.stream)
    if not plan.dry_run and not plan.option(kind.traits.target_option):
        raise ConfigFieldError(kind.traits.target_option, MISSING,
                               f"name the {kind.traits.target_noun} to write to, or use "
                               "--dry-run")
    keyring = keyring_from_config(config)
    async with connectors.open_store(config.store) as store:
        shards = await with_predecessors(store, keyring, stream_shards(config, plan.stream))
        for shard in shards:  # every log checked before anything is written
            await check_log(store, keyring, shard.log_id,
                            "--log-id" if args.store else "log_id", plan.stream)
        for shard in shards:  # disjoint partitions: one log after the other
            result = await replay(shard, store, keyring, plan,
                                  render.replay_progress(kind.traits.unit),
                                  pin=not plan.dry_run)
            print(file=sys.stderr)
            _emit(render.replay(shard.log_id, plan, kind, result))
    return EXIT_OK


async def with_predecessors(store: Store, keyring: KeyRing, shards: list[Config]
                            ) -> list[Config]:
    """The logs a replay of `shards` reads: those the set was handed over from by a shard
    count change (older sets first, each to its end), then the set's own."""
    from drstream.daemon.reshard import predecessors

    older: list[str] = []
    for shard in shards:
        older += [p for p in await predecessors(store, keyring, shard.log_id) if p not in older]
    return [shards[0].model_copy(update={"log_id": p}) for p in older] + shards


async def _shards_change(args: argparse.Namespace, connectors: Connectors) -> int:
    from drstream.daemon.reshard import change_count

    config = _config(args, connectors)
    if config.shards.index is not None:
        raise ConfigFieldError("--shard", config.shards.index, "a count change takes the "
                               "whole set")
    if not 1 <= args.to <= MAX_SHARDS:
        raise ConfigFieldError("--to", args.to, f"a shard count is 1 to {MAX_SHARDS}")
    keyring = keyring_from_config(config)
    async with connectors.open_store(config.store) as store:
        report = await change_count(config, store, keyring, args.to)
    if args.json:
        _emit_json(report.to_json())
    else:
        _emit(render.shards_change(report))
    return EXIT_OK


async def _drill(args: argparse.Namespace, connectors: Connectors) -> int:
    from drstream.daemon.drill import drill, drill_stamp
    from drstream.daemon.replay import check_log

    config = _config(args, connectors)
    plan = _plan(args, connectors)
    kind = connectors.stream(plan.stream)
    keyring = keyring_from_config(config)
    shards = stream_shards(config, plan.stream)
    reports = []
    async with connectors.open_store(config.store) as store:
        for shard in shards:
            await check_log(store, keyring, shard.log_id, "log_id", plan.stream)
        for shard in shards:  # each shard's log into scratch targets of its own
            scratch = kind.drill(plan, shard.log_id, shard.sinks, drill_stamp())
            reports.append(await drill(shard, store, keyring, scratch, args.keep,
                                       render.replay_progress(kind.traits.unit)))
            print(file=sys.stderr)
    if args.json:
        _emit_json(reports[0].doc if config.shards.count == 1 else [r.doc for r in reports])
    else:
        _emit([line for r in reports for line in render.drill(r)])
    return EXIT_OK if all(r.ok for r in reports) else EXIT_PROBLEMS


async def _prune(args: argparse.Namespace, connectors: Connectors) -> int:
    from drstream.daemon.prune import prune

    config = _config(args, connectors)
    older = parse_duration_s(args.older_than)
    if not config.sinks and not args.no_sink_check:
        raise ConfigError(args.config, [ConfigFieldError(
            "sinks", [], "prune keeps every segment a sink has not applied, and this config "
            "has none (a ship config?): run it with the standby's (apply) config, or give "
            "--no-sink-check to prune by age alone")])
    grace = parse_duration_s(args.blob_grace, "--blob-grace")
    keyring = keyring_from_config(config)
    async with connectors.open_store(config.store) as store:
        for shard in each_shard(config):
            result = await prune(shard, store, keyring, older, dry_run=args.dry_run,
                                 blob_grace_s=grace)
            _emit(render.prune(shard.log_id, result, args.dry_run))
    return EXIT_OK


async def _bench(args: argparse.Namespace, connectors: Connectors) -> int:
    from drstream.daemon.bench import check_spec, run_bench

    config = _config(args, connectors)
    spec = BenchSpec(rate=args.rate, seconds=args.duration, record_bytes=args.record_bytes,
                     partitions=args.partitions, name=args.topic)
    check_spec(spec)
    for flag, value in (("--ready-timeout", args.ready_timeout),
                        ("--drain-timeout", args.drain_timeout)):
        if not 0 < value <= 3600:
            raise ConfigFieldError(flag, value, "seconds, more than 0 and at most 3600")
    if args.out and not Path(args.out).parent.is_dir():
        raise ConfigFieldError("--out", args.out, "its directory does not exist")
    source, sink, bench = _bench_pair(config, connectors, args.stream)
    load = bench(source, sink, spec)
    keyring = keyring_from_config(config)
    interrupt = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if interrupt.is_set():  # a second one: end at once (the topic stays)
            _interrupted(sig)
        interrupt.set()  # stop producing, remove the bench topic, report what arrived

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    async with connectors.open_store(config.store) as store:
        report = await run_bench(store, keyring, config.log_id, load, spec,
                                 ready_timeout_s=args.ready_timeout,
                                 drain_timeout_s=args.drain_timeout,
                                 progress=render.bench_progress(), interrupt=interrupt,
                                 keep=args.keep)
    print(file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(report.doc, indent=2) + "\n")
    if args.json:
        _emit_json(report.doc)
    else:
        _emit(render.bench(report))
    if interrupt.is_set():
        return 128 + signal.SIGINT
    return EXIT_OK if report.ok else EXIT_PROBLEMS


def _bench_pair(config: Config, connectors: Connectors, stream: str | None
                ) -> tuple[ConnectorConfig, ConnectorConfig, BenchFactory]:
    """The source the bench writes through, a sink of the config applying its stream, and
    the source connector's bench."""
    for source in config.sources:
        if stream is not None and source.stream != stream:
            continue
        sink = next((s for s in config.sinks if s.applies == source.stream), None)
        bench = connectors.bench(source.type) if sink is not None else None
        if bench is not None and sink is not None:
            return source, sink, bench
    wanted = f"stream {stream}" if stream else "a stream"
    raise ConfigFieldError("sources/sinks", MISSING, f"bench needs {wanted} that the config "
                           "both reads (sources: where it writes) and applies (sinks: where "
                           "it reads back), of a kind that offers bench (kafka)")


async def _log_truncate(args: argparse.Namespace, connectors: Connectors) -> int:
    from drstream.daemon.truncate import truncate

    config = _config(args, connectors)
    if args.after < 0:
        raise ConfigFieldError("--after", args.after, "must be a seq >= 0")
    configure_logging(config.logging.level, config.logging.format)
    async with connectors.open_store(config.store) as store:
        result = await truncate(config, store, args.after, dry_run=args.dry_run,
                                reason=args.reason or "")
    if args.json:
        _emit_json(result.to_json())
    else:
        _emit(render.truncate(result, args.dry_run))
    return EXIT_OK


# -- the parser ----------------------------------------------------------------------------


def _command(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
             help: str, group: str = "") -> argparse.ArgumentParser:
    """The parser of one command, its handler named by the command ("keys generate")."""
    p = sub.add_parser(name, help=help)
    p.set_defaults(handler=f"{group} {name}".lstrip())
    return p


def _group(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
           help: str) -> functools.partial[argparse.ArgumentParser]:
    """A command of several actions ("log truncate"): the maker of its actions' parsers."""
    actions = sub.add_parser(name, help=help).add_subparsers(
        dest=f"{name}_command", required=True, metavar="ACTION")
    return functools.partial(_command, actions, group=name)


def _add_json(p: argparse.ArgumentParser, help: str = "machine-readable output") -> None:
    p.add_argument("--json", action="store_true", help=help)


def _add_secret_args(p: argparse.ArgumentParser, *, keys: bool = True) -> None:
    """How an operator hands over what the service gets from systemd credentials."""
    if keys:
        p.add_argument("--key", action="append", default=[], metavar="ID=REF",
                       help="load key ID from REF instead of the config's reference, e.g. "
                       "k1=file:/etc/drstream/k1.key where the config says "
                       "credential:drstream-k1 (repeatable; a new ID joins the key ring)")
    p.add_argument("--credential", action="append", default=[], metavar="NAME=REF",
                   help="resolve every credential:NAME of the config (store keys, Kafka "
                   "secret_properties) from REF instead, e.g. "
                   "kafka-password=file:/etc/drstream/kafka.pw (repeatable)")


SHARD_HELP = ("a shard of a log set (shards.count in the config): K, or K/N to set the "
              "count too; default every shard")


def _add_shard(p: argparse.ArgumentParser, help: str = SHARD_HELP) -> None:
    p.add_argument("--shard", metavar="K[/N]", help=help)


def _add_config(p: argparse.ArgumentParser, *, required: bool = True,
                keys: bool = True, help: str = "path of the YAML config") -> None:
    p.add_argument("--config", required=required, help=help)
    _add_secret_args(p, keys=keys)


def _add_replay_args(p: argparse.ArgumentParser, connectors: Connectors,
                     stream_options: bool) -> None:
    p.add_argument("--until", metavar="TIME",
                   help="RFC 3339: Kafka records with timestamps up to it; registry events "
                   "carry no time of their own, so for mlflow: streams the events of the "
                   "segments written (when the change was observed) at or before it")
    p.add_argument("--until-seq", type=int, metavar="N", help="segments up to N (inclusive)")
    p.add_argument("--parallel", type=int, default=4, metavar="N",
                   help=f"segment fetches in flight, 1 to {MAX_PARALLEL} (applied in order)")
    if not stream_options:
        return
    kinds = list(connectors.streams.values())
    default = ", or ".join([k.traits.default_stream for k in kinds[:1]] + [
        f"{k.traits.default_stream} with {k.traits.target_option}" for k in kinds[1:]])
    p.add_argument("--stream", default=None,
                   help=f"stream in the log to replay (default {default})")
    for _, opt in connectors.stream_options():
        if opt.repeat:
            p.add_argument(opt.flag, metavar=opt.metavar, help=opt.help, action="append")
        else:
            p.add_argument(opt.flag, metavar=opt.metavar, help=opt.help)


STREAM_COMMANDS = ("replay", "drill")
Handler = Callable[[argparse.Namespace, Connectors], Coroutine[Any, Any, int]]
HANDLERS: dict[str, Handler] = {
    "validate": _validate, "keys generate": _keys_generate, "verify": _verify,
    "ship": functools.partial(_serve, role="ship"),
    "apply": functools.partial(_serve, role="apply"), "status": _status, "failover": _failover,
    "replay": _replay, "drill": _drill, "prune": _prune, "bench": _bench,
    "log truncate": _log_truncate, "shards change": _shards_change,
}
SERVICES = ("ship", "apply")  # drain on a signal instead of ending at once


def build_parser(connectors: Connectors, *, stream_options: bool = True
                 ) -> argparse.ArgumentParser:
    """The parser; without `stream_options`, replay and drill lack the options of each
    stream kind (those import every connector)."""
    parser = argparse.ArgumentParser(
        prog="drstream",
        description="Disaster-recovery replication through an encrypted, hash-chained delta "
        "log. Exit codes: 0 ok, 1 problems found (verify, drill, status), 2 bad usage or "
        "config, 3 runtime failure.",
    )
    parser.add_argument("--version", action="version", version=f"drstream {__version__}")
    parser.add_argument("--log-level", default=None,
                        choices=["debug", "info", "warning", "error"],
                        help="wins over the config's logging.level (default info)")
    parser.add_argument("--log-format", default=None, choices=["auto", "json", "console"],
                        help="wins over the config's logging.format (default auto: console "
                        "on a terminal, else JSON lines, the command's error line included)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "validate", help="check a config file; exit 2 with every error found")
    p.add_argument("config", help="path of the YAML config")
    p.add_argument("--check-keys", action="store_true",
                   help="also load every key of the key ring (without it, key files are "
                   "checked for existence and mode only)")
    _add_secret_args(p)
    _add_shard(p, "check the config as shard K (of N) runs it (with shards.count, every shard "
               "is listed)")

    keys = _group(sub, "keys", help="manage encryption keys")
    p = keys("generate", help="write a new random 256-bit key file (mode 0600)")
    p.add_argument("path", help="where to write the key; an existing file is never overwritten")
    p.add_argument("--id", default="k1",
                   help="key id to show in the config snippet ([A-Za-z0-9._-], up to 64)")

    p = _command(sub, "verify", help="walk a log's hash chain; --deep also checks every MAC")
    p.add_argument("url", nargs="?", help="store URL (file:///path, s3://bucket/prefix, "
                   "gs://bucket/prefix, az://account/container/prefix)")
    _add_config(p, required=False, help="take store, log_id and keys from this config")
    p.add_argument("--log-id", help="verify only this log (default: every log in the store)")
    p.add_argument("--deep", action="store_true",
                   help="decrypt and decode every segment (needs the keys: --config or --key)")
    p.add_argument("--from-seq", type=int, default=1, metavar="N")
    p.add_argument("--to-seq", type=int, default=None, metavar="N")
    _add_json(p, "machine-readable report")
    _add_shard(p, "with --config of a log set: only shard K's log (default every shard's)")

    p = _command(sub, "ship", help="tail the configured sources into the delta log until SIGTERM")
    p.add_argument("--config", required=True, help="path of the YAML config")
    _add_shard(p, "the shard of the log set to ship (needed when shards.count > 1; K/N also "
               "sets the count), e.g. a systemd instance or a StatefulSet ordinal")

    p = _command(sub, "apply", help="follow the delta log into the standby sinks until SIGTERM")
    p.add_argument("--config", required=True, help="path of the YAML config")
    _add_shard(p, "the shard of the log set to apply (needed when shards.count > 1; K/N also "
               "sets the count)")

    p = _command(sub, "status", help="durable head, ship lag and RPO per source, apply lag "
                 "per sink; exit 1 on a problem (unreachable, over a threshold)")
    _add_config(p)
    p.add_argument("--max-rpo", type=float, metavar="SECONDS",
                   help="a problem when a stream's RPO is unknown or over this")
    p.add_argument("--max-lag", type=float, metavar="SECONDS",
                   help="a problem when a sink's apply lag is over this")
    _add_json(p)
    _add_shard(p)

    p = _command(sub, "failover", help="apply every durable segment, sync consumer-group "
                 "offsets, report and record the final RPO")
    _add_config(p)
    _add_json(p)
    _add_shard(p)

    p = _command(sub, "replay", help="rebuild topics or a model registry from the log up "
                 "to a time or seq; resumable, with progress")
    p.add_argument("--config", help="take store, log_id and keys from this config")
    p.add_argument("--store", metavar="URL",
                   help="or: the store URL (file://, s3://, gs://, az://)")
    p.add_argument("--log-id", help="with --store: the log to replay")
    _add_secret_args(p)
    _add_replay_args(p, connectors, stream_options)
    p.add_argument("--name", default="replay",
                   help="names this replay's checkpoint: rerun with the same name to resume")
    p.add_argument("--dry-run", action="store_true", help="report what would be written")
    _add_shard(p, "with --config of a log set: replay only shard K's log (default every "
               "shard's, one after the other)")

    p = _command(sub, "drill", help="replay into scratch topics (or a scratch registry "
                 "with --target-mlflow), compare with the log, report RTO/RPO; exit 1 on "
                 "any mismatch or bad segment, 3 when the target cannot be reached")
    _add_config(p)
    _add_replay_args(p, connectors, stream_options)
    p.add_argument("--keep", action="store_true",
                   help="keep the scratch topics (or the models in the scratch registry)")
    _add_json(p, "print the report as JSON")
    _add_shard(p)

    p = _command(sub, "prune", help="delete old segments no sink of the config still needs")
    _add_config(p, help="the standby's (apply) config: its sinks' progress decides what "
                "may go")
    p.add_argument("--older-than", required=True, metavar="DURATION",
                   help="e.g. 7d, 12h: only segments written before now minus this")
    p.add_argument("--blob-grace", default="1d", metavar="DURATION",
                   help="delete a blob no segment names only once it is this old (a running "
                   "ship uploads a version's files before the segment naming them)")
    p.add_argument("--dry-run", action="store_true", help="report, delete nothing")
    p.add_argument("--no-sink-check", action="store_true",
                   help="allow a config without sinks: prune by age and the head alone, "
                   "whatever a standby has applied")
    _add_shard(p)

    p = _command(sub, "bench", help="replication-lag benchmark through the running ship and "
                 "apply: stamped records into a bench topic on the primary (created and "
                 "removed by it), read on the standby; lag and RPO percentiles, JSON")
    _add_config(p, help="a config with the source (primary) and the sink (standby) the "
                "running ship and apply use")
    p.add_argument("--rate", type=float, default=1000, metavar="N",
                   help="records per second (default 1000)")
    p.add_argument("--duration", type=float, default=60, metavar="SECONDS",
                   help="how long to produce (default 60)")
    p.add_argument("--record-bytes", type=int, default=1000, metavar="N",
                   help="value size of each record, random bytes (default 1000)")
    p.add_argument("--partitions", type=int, default=6, metavar="N",
                   help="partitions of the bench topic (default 6)")
    p.add_argument("--topic", metavar="NAME", help="the bench topic (default "
                   "drstream-bench-<time>-<random>); the source's topics.include must select "
                   "it and it must not exist")
    p.add_argument("--stream", help="the source to write through, e.g. kafka:primary "
                   "(default: the first one the config also applies)")
    p.add_argument("--ready-timeout", type=float, default=60, metavar="SECONDS",
                   help="how long ship and apply may take to bring the new topic to the "
                   "standby (default 60)")
    p.add_argument("--drain-timeout", type=float, default=60, metavar="SECONDS",
                   help="after the load, how long to wait for the last records (default 60)")
    p.add_argument("--keep", action="store_true",
                   help="keep the bench topic and its standby copy (default: both removed)")
    _add_json(p, "print the report as JSON")
    p.add_argument("--out", metavar="PATH", help="also write the JSON report to PATH")

    logs = _group(sub, "log", help="repair a log the writer stopped on (audited)")
    p = logs("truncate", help="remove every segment after a seq (never one under Object "
             "Lock), storing an audit record first; ship then resumes after that seq")
    _add_config(p, keys=False)
    p.add_argument("--after", type=int, required=True, metavar="SEQ",
                   help="the last segment to keep")
    p.add_argument("--reason", help="why, for the audit record")
    p.add_argument("--dry-run", action="store_true", help="list what would go, remove nothing")
    _add_json(p)

    shards = _group(sub, "shards", help="change the shard count of a log set (planned)")
    p = shards("change", help="seal every log of the set at its head and start the logs of a "
               "set of --to shards exactly there (stop the old ship shards first); "
               "docs/shards.md")
    _add_config(p, help="the ship (primary) config, with the current shards.count")
    p.add_argument("--to", type=int, required=True, metavar="M", help="the new shard count")
    _add_json(p)
    return parser


def main(argv: list[str] | None = None, connectors: Connectors | None = None) -> int:
    """The command line; `connectors` default to the installed ones (entry points)."""
    try:
        connectors = connectors if connectors is not None else installed()
        words = sys.argv[1:] if argv is None else argv
        # Only replay and drill take every stream kind's options: other commands (ship,
        # apply) then import just the connectors their config names.
        streams = any(w in STREAM_COMMANDS for w in words)
        args = build_parser(connectors, stream_options=streams).parse_args(argv)
        pin(args.log_level, args.log_format)
        configure_logging()
        code: int = run_async(HANDLERS[args.handler](args, connectors),
                              interruptible=args.handler not in SERVICES)
    except ConfigError as e:
        _report_failure(EXIT_USAGE, str(e), [str(f) for f in e.errors])
        return EXIT_USAGE
    except ConfigFieldError as e:
        _report_failure(EXIT_USAGE, f"invalid argument: {e}")
        return EXIT_USAGE
    except DrstreamError as e:
        _report_failure(EXIT_FAILURE, f"error: {e}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        _report_failure(130, "interrupted")
        return 130
    except Exception as e:  # a bug or an unwrapped library error: one line, exit 3
        get_logger("drstream").debug("unexpected_error", exc_info=True)
        _report_failure(EXIT_FAILURE, f"error: unexpected {type(e).__name__}: {e}")
        return EXIT_FAILURE
    return code


if __name__ == "__main__":
    sys.exit(main())
