"""Running ship or apply as a service: signals, sd_notify, metrics, health, reload.

SIGTERM/SIGINT: STOPPING=1, stop intake, drain within the deadline, exit 0; a second one
exits at once. SIGHUP: RELOADING=1, re-read the config, apply what can change live, READY=1;
an invalid new config is logged and the old one keeps running.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Protocol

from drstream.daemon import __version__
from drstream.daemon.config import Config, load_config
from drstream.daemon.errors import EXIT_FAILURE, ConfigError, ConfigFieldError
from drstream.daemon.keyring import KeyRing
from drstream.daemon.logging import configure_logging, get_logger
from drstream.daemon.metrics import INFO, Health, MetricsServer
from drstream.daemon.notify import Notifier
from drstream.daemon.outage import PatientStore
from drstream.daemon.store import Store
from drstream.daemon.tip import TipSource

log = get_logger("drstream.service")

TEST_HOOKS_ENV = "DRSTREAM_TEST_HOOKS"  # "1": SIGUSR2 blocks the event loop (watchdog tests)


class Component(Protocol):
    """What a service runs (the shipper or the applier, daemon.lifecycle)."""

    ready: asyncio.Event
    health: Health

    async def run(self, stop: asyncio.Event) -> object: ...

    def reload(self, config: Config) -> None: ...

    def summary(self) -> str: ...

    async def close(self) -> None: ...


Factory = Callable[[Config, Store, KeyRing], Component]

# What SIGHUP may not change: identity and wiring (a restart is needed for those).
FROZEN_ON_RELOAD = ("log_id", "store", "keyring")


def _exit_now(code: int) -> None:
    """End the process without waiting for client threads blocked in a library call."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Service:
    def __init__(self, role: str, config_path: str, config: Config,
                 select: Callable[[Config], Config] = lambda c: c) -> None:
        self.role = role
        self.config_path = config_path
        self.config = config
        self.select = select  # the shard this service runs, of a reloaded config
        self.notifier = Notifier()
        self.health = Health(config.service.stall_after_s)
        self.stop = asyncio.Event()
        self.component: Component | None = None

    async def run(self, keyring: KeyRing, factory: Factory) -> int:
        listen = (self.config.service.ship_metrics_listen if self.role == "ship"
                  else self.config.service.apply_metrics_listen)
        metrics = MetricsServer(listen, self.health) if listen else None
        INFO.labels(self.role, self.config.log_id, __version__).set(1)
        self._install_signals()
        try:
            if metrics is not None:
                await metrics.start()
            store = PatientStore(self.config.connectors.open_store(self.config.store),
                                 self.config.service.outage_budget_s)
            # an outage is not-ready (drstream_store_up 0), not an exit
            self.health.checks.append(store.health)
            async with store:
                self.component = factory(self.config, store, keyring)
                tip = getattr(self.component, "tip_source", None)
                if metrics is not None and isinstance(tip, TipSource):
                    metrics.tip = tip  # ship serves /tip (daemon/tip.py)
                # the service's Health serves /readyz: it takes over the component's checks
                self.health.checks.extend(self.component.health.checks)
                self.component.health = self.health
                try:
                    task = asyncio.create_task(self.component.run(self.stop))
                    await self._announce_ready(task)
                    await task
                finally:
                    await self.component.close()
        finally:
            await self.notifier.close()
            if metrics is not None:
                await metrics.close()
        return 0

    async def _announce_ready(self, task: asyncio.Task[object]) -> None:
        assert self.component is not None
        ready = asyncio.create_task(self.component.ready.wait())
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if task.done():
            return  # failed (or stopped) before it was ready: run() re-raises
        self.health.connected = True
        self.notifier.ready(self.component.summary())
        self.notifier.start_watchdog(self.component.summary)
        log.info("service_ready", role=self.role)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        if os.environ.get(TEST_HOOKS_ENV) == "1":
            loop.add_signal_handler(signal.SIGUSR2, self._block_loop)

    def _on_stop(self, signame: str) -> None:
        if self.stop.is_set():
            log.warning("second_stop_signal", signal=signame, action="exit without draining")
            _exit_now(EXIT_FAILURE)
        log.info("stop_requested", signal=signame)
        self.notifier.stopping()
        self.stop.set()
        started = self.component is not None and self.component.ready.is_set()
        if not started:
            # Still starting: nothing read, nothing to drain. A connect blocked on a broker
            # that does not answer would otherwise hold the stop for connect_timeout_s and
            # end in exit 3, leaving `systemctl stop` with a failed unit.
            log.info("stopped_while_starting", role=self.role)
            _exit_now(0)

    def _on_reload(self) -> None:
        self.notifier.reloading()
        changed: list[str] = []
        try:
            new = self.select(load_config(self.config_path))
            changed = [k for k in FROZEN_ON_RELOAD if getattr(new, k) != getattr(self.config, k)]
            if changed:
                raise ConfigError(self.config_path, [])  # reported below with the keys
            if self.component is not None:
                self.component.reload(new)
            configure_logging(new.logging.level, new.logging.format)
            self.config = new
            log.info("config_reloaded", path=self.config_path)
        except ConfigFieldError as e:  # the shard this service runs is gone (--shard)
            log.error("config_reload_rejected", path=self.config_path, error=str(e))
        except ConfigError as e:
            detail = str(e) if e.errors else f"{changed} cannot change without a restart"
            log.error("config_reload_rejected", path=self.config_path, error=detail)
        finally:
            if self.health.connected:  # a reload before start-up finished must not claim READY
                self.notifier.ready()

    @staticmethod
    def _block_loop() -> None:
        seconds = float(os.environ.get("DRSTREAM_TEST_BLOCK_S", "5"))
        log.warning("test_hook_blocking_loop", seconds=seconds)
        time.sleep(seconds)
