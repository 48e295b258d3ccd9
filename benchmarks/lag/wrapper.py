"""The ship/apply wrapper (`python -m benchmarks.lag _daemon`): drstream with every store
operation timed."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.lag.base import thread_groups


def daemon_main(argv: list[str]) -> int:
    """`_daemon --ops-out PATH -- ship|apply --config F`: runs `drstream` (daemon.cli.main)
    with every store operation recorded as it completes: one JSON line
    [wall ns, op, key, bytes] per PUT/GET/HEAD/LIST/DELETE, appended to --ops-out every
    0.5 s. A PUT's completion is when the segment is durable (the file store links a
    fsynced file; S3 answered the PUT). Costs a list append per store call."""
    ap = argparse.ArgumentParser(prog="benchmarks.lag _daemon")
    ap.add_argument("--ops-out", type=Path, required=True)
    ap.add_argument("--profile-out", type=Path, default=None,
                    help="wall-clock stack samples of every thread + CPU per thread, as JSON")
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    from drstream.connectors.azure.store import AzureStore
    from drstream.connectors.file.store import FileStore
    from drstream.connectors.gcs.store import GcsStore
    from drstream.connectors.s3.store import S3Store

    events: list[tuple[int, str, str, int]] = []
    record = events.append

    def timed(cls: Any, method: str, op: str) -> None:
        orig = getattr(cls, method)

        async def wrapper(self: Any, key: str, *a: Any, **kw: Any) -> Any:
            result = await orig(self, key, *a, **kw)
            if op == "PUT":
                nbytes = len(a[0]) if a else len(kw.get("data", b""))
            else:
                nbytes = len(result) if isinstance(result, bytes) else 0
            record((time.time_ns(), op, key, nbytes))
            return result

        setattr(cls, method, wrapper)

    def listed(cls: Any) -> None:
        orig = cls.list

        def wrapper(self: Any, prefix: str, *a: Any, **kw: Any) -> Any:
            record((time.time_ns(), "LIST", prefix, 0))
            return orig(self, prefix, *a, **kw)

        cls.list = wrapper

    for cls in (FileStore, S3Store, GcsStore, AzureStore):
        timed(cls, "put_if_absent", "PUT")
        timed(cls, "get", "GET")
        timed(cls, "delete", "DELETE")
        listed(cls)
    for cls in (FileStore, GcsStore, AzureStore):  # one HEAD (metadata GET) request each
        timed(cls, "exists", "HEAD")
    timed(S3Store, "version_id", "HEAD")  # S3Store.exists calls it: one HEAD request

    halt = threading.Event()

    def flush() -> None:
        n = len(events)
        if not n:
            return
        batch = events[:n]
        del events[:n]
        with open(args.ops_out, "a") as f:
            f.write("".join(json.dumps(e) + "\n" for e in batch))

    def flusher() -> None:
        while not halt.wait(0.5):
            flush()

    thread = threading.Thread(target=flusher, name="bench-ops-flusher", daemon=True)
    thread.start()
    from drstream.daemon.cli import main as cli_main

    sampler = None
    if args.profile_out is not None:
        from benchmarks.common import StackSampler

        sampler = StackSampler(0.01).start()
    try:
        return cli_main(rest)
    finally:
        halt.set()
        thread.join()
        flush()
        if sampler is not None and args.profile_out is not None:
            sampler.stop()
            report = sampler.report(top=25)
            report["thread_groups_cpu_s"] = thread_groups(os.getpid(), top=20)
            args.profile_out.write_text(json.dumps(report, indent=1))


def read_ops(path: Path) -> list[tuple[int, str, str, int]]:
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                t, op, key, n = json.loads(line)
                out.append((int(t), str(op), str(key), int(n)))
    return out
