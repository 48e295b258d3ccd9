"""Start and stop the test services by hand, for benchmarks and debugging.

    python -m tests.infra kafka up [--count 2] [--detach] [--json] [--keep]
    python -m tests.infra s3 up [--detach] [--bucket NAME]
    python -m tests.infra gcs up [--detach] [--bucket NAME]     # fake-gcs-server
    python -m tests.infra azurite up [--detach] [--container NAME]
    python -m tests.infra mlflow up [--count 2] [--detach] [--json]
    python -m tests.infra stop PID [PID ...]   # one recorded service, e.g. a detached broker
    python -m tests.infra stop-all             # every recorded service (after a crashed run)

Each service registers a subcommand in build_parser(); its handler gets the parsed
arguments and returns the exit code.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from tests.infra.procs import ServiceStartError, stop_all_recorded, stop_recorded

if TYPE_CHECKING:
    from tests.infra.emulators import AzuriteServer, FakeGcsServer
    from tests.infra.s3 import S3Server


def _print_services(services: list[dict[str, object]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(services), flush=True)
        return
    for s in services:
        print("  ".join(f"{k}={v}" for k, v in s.items()), flush=True)


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so `finally` blocks stop what was started."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def _wait_for_signal(alive: Callable[[], bool]) -> int:
    """Block until Ctrl-C or SIGTERM (exit 0) or until a service dies on its own (exit 1)."""
    try:
        while alive():
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    print("a service exited on its own; stopping the others", file=sys.stderr)
    return 1


def kafka_up(args: argparse.Namespace) -> int:
    # Imported here so `stop-all` works even where the Kafka client library is missing.
    from tests.infra.kafka import cluster_names, start_clusters

    if not args.detach:
        _exit_on_sigterm()
    started = time.monotonic()
    clusters = start_clusters(cluster_names(args.count))
    _print_services([
        {"name": c.name, "bootstrap": c.bootstrap_servers, "pid": c.pid,
         "workdir": str(c.workdir), "log": str(c.log_path)}
        for c in clusters
    ], args.json)
    print(f"{len(clusters)} Kafka cluster(s) up in {time.monotonic() - started:.1f}s",
          file=sys.stderr, flush=True)
    if args.detach:
        return 0  # they keep running; `stop PID` or `stop-all` ends them
    try:
        return _wait_for_signal(lambda: all(c.alive() for c in clusters))
    finally:
        for c in clusters:
            if args.keep:
                c.stop()
            else:
                c.remove()


def s3_up(args: argparse.Namespace) -> int:
    from tests.infra.s3 import S3Server

    if not args.detach:
        _exit_on_sigterm()
    server = S3Server.start_new()
    bucket = server.create_bucket(args.bucket) if args.bucket else None
    pid = server.proc.pid if server.proc else None
    _print_services([{"name": "s3", "endpoint": server.endpoint_url, "pid": pid,
                      "access_key": server.access_key, "secret_key": server.secret_key,
                      "bucket": bucket}], args.json)
    return _serve(server, args.detach)


def _serve(server: S3Server | FakeGcsServer | AzuriteServer, detach: bool) -> int:
    """Leave a started server running (detach) or serve until a signal, then stop it."""
    if detach:
        return 0
    try:
        return _wait_for_signal(server.alive)
    finally:
        server.stop()


def emulator_up(args: argparse.Namespace) -> int:
    from tests.infra.emulators import AzuriteServer, FakeGcsServer

    if not args.detach:
        _exit_on_sigterm()
    server: FakeGcsServer | AzuriteServer
    if args.service == "gcs":
        server = FakeGcsServer("fake-gcs")
        server.start()
        where = {"bucket": server.create_bucket(args.bucket, versioning=True)
                 if args.bucket else None}
    else:
        server = AzuriteServer("azurite")
        server.start()
        where = {"account_url": server.account_url,
                 "container": server.create_container(args.container)
                 if args.container else None}
    pid = server.proc.pid if server.proc else None
    _print_services([{"name": args.service, "endpoint": server.endpoint_url, "pid": pid,
                      **where}], args.json)
    return _serve(server, args.detach)


def mlflow_up(args: argparse.Namespace) -> int:
    from tests.infra.mlflow import start_servers

    if not args.detach:
        _exit_on_sigterm()
    names = ("primary", "standby", *(f"mlflow{i}" for i in range(3, args.count + 1)))
    servers = start_servers(names[: args.count])
    _print_services([{"name": s.name, "tracking_uri": s.tracking_uri, "pid": s.pid,
                      "workdir": str(s.workdir), "log": str(s.log_path)}
                     for s in servers], args.json)
    if args.detach:
        return 0
    try:
        return _wait_for_signal(lambda: all(s.alive() for s in servers))
    finally:
        for s in servers:
            s.remove()


def stop(args: argparse.Namespace) -> int:
    for pid in args.pids:
        print(f"{pid}: {'stopped' if stop_recorded(pid) else 'not running or not recorded'}")
    return 0


def stop_all(args: argparse.Namespace) -> int:
    killed = stop_all_recorded()
    print(f"killed {len(killed)} recorded service process(es): {killed}")
    return 0


def _add_kafka(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    kafka = sub.add_parser("kafka", help="single-node Apache Kafka (KRaft) clusters")
    actions = kafka.add_subparsers(dest="action", required=True)
    up = actions.add_parser("up", help="start clusters (primary, standby, ...) and print them")
    up.add_argument("--count", type=int, default=2, help="independent clusters (default 2)")
    up.add_argument("--detach", action="store_true",
                    help="leave them running and exit; stop with `stop PID` or `stop-all`")
    up.add_argument("--json", action="store_true", help="print one JSON list instead")
    up.add_argument("--keep", action="store_true",
                    help="keep work directories (data, server.log) after Ctrl-C")
    up.set_defaults(func=kafka_up)


def _add_s3(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s3 = sub.add_parser("s3", help="an S3 API server (moto, server mode)")
    actions = s3.add_subparsers(dest="action", required=True)
    up = actions.add_parser("up", help="start the server and print its endpoint")
    up.add_argument("--bucket", help="create this bucket")
    up.add_argument("--detach", action="store_true", help="leave it running and exit")
    up.add_argument("--json", action="store_true", help="print one JSON list instead")
    up.set_defaults(func=s3_up)


def _add_emulators(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, what, place in (("gcs", "a GCS API emulator (fake-gcs-server)", "bucket"),
                              ("azurite", "an Azure Blob emulator (Azurite)", "container")):
        service = sub.add_parser(name, help=what)
        actions = service.add_subparsers(dest="action", required=True)
        up = actions.add_parser("up", help="start the emulator and print its endpoint")
        up.add_argument(f"--{place}", help=f"create this {place}")
        up.add_argument("--detach", action="store_true", help="leave it running and exit")
        up.add_argument("--json", action="store_true", help="print one JSON list instead")
        up.set_defaults(func=emulator_up)


def _add_mlflow(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mlflow = sub.add_parser("mlflow", help="MLflow tracking servers (SQLite, served artifacts)")
    actions = mlflow.add_subparsers(dest="action", required=True)
    up = actions.add_parser("up", help="start servers (primary, standby, ...) and print them")
    up.add_argument("--count", type=int, default=2, help="independent servers (default 2)")
    up.add_argument("--detach", action="store_true", help="leave them running and exit")
    up.add_argument("--json", action="store_true", help="print one JSON list instead")
    up.set_defaults(func=mlflow_up)


def _add_stop(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    one = sub.add_parser("stop", help="stop recorded services by pid (SIGTERM, then SIGKILL)")
    one.add_argument("pids", type=int, nargs="+")
    one.set_defaults(func=stop)
    every = sub.add_parser("stop-all", help="kill every recorded service process")
    every.set_defaults(func=stop_all)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.infra", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="service", required=True)
    _add_kafka(sub)
    _add_s3(sub)
    _add_emulators(sub)
    _add_mlflow(sub)
    _add_stop(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ServiceStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
