"""The systemd units in systemd/: `systemd-analyze verify` passes, the hardening and the
service contract (Type=notify, watchdog, reload, credentials) are what the daemon expects,
a bad config stops the unit instead of a restart loop, and the prune timer is sound.

`systemd-analyze verify` checks that every Exec*= binary exists, so it runs on a temporary
copy of each unit whose /usr/bin/drstream points at this venv's `drstream` console
script (the only change). A missing systemd-analyze fails these tests, never skips them
(`make install` and `.ci/run` install it with `.ci/install-tools.sh`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from drstream.daemon.cli import build_parser
from drstream.daemon.config import DEFAULT_DRAIN_DEADLINE_S, parse_config
from drstream.daemon.keyring import generate_key_file
from drstream.daemon.plan import parse_duration_s
from drstream.daemon.plugins import installed

ROOT = Path(__file__).resolve().parents[2]
UNITS = {"ship": ROOT / "systemd" / "drstream-ship.service",
         "apply": ROOT / "systemd" / "drstream-apply.service"}
TEMPLATES = {"ship": ROOT / "systemd" / "drstream-ship@.service",
             "apply": ROOT / "systemd" / "drstream-apply@.service"}
PRUNE = ROOT / "systemd" / "drstream-prune.service"
TIMER = ROOT / "systemd" / "drstream-prune.timer"
SERVICES = {**UNITS, **{f"{r}@": p for r, p in TEMPLATES.items()}, "prune": PRUNE}
CALENDAR_PERIOD_S = {"hourly": 3600, "daily": 86400, "weekly": 7 * 86400}
INSTALLED_BIN = "/usr/bin/drstream"
CONFIG = "/etc/drstream/drstream.yaml"
VENV_BIN = Path(sys.executable).parent / "drstream"
MAX_EXPOSURE = 2.5  # `systemd-analyze security` overall exposure (0 best .. 10 worst)

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """Sections -> [(key, value)] in order; repeated keys kept (systemd accumulates them)."""
    unit: Unit = {}
    section = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith(("#", ";")):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            unit.setdefault(section, [])
            continue
        assert section is not None, f"directive outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {line!r}"
        unit[section].append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: Unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= set {len(found)} times: {found}"
    return found[0]


def seconds(value: str) -> float:
    """A systemd time span in the forms these units use: 30, 30s, 5min, 1min 30s."""
    total = 0.0
    for part in value.split():
        for suffix, mult in (("min", 60), ("ms", 0.001), ("s", 1), ("h", 3600)):
            if part.endswith(suffix):
                total += float(part[: -len(suffix)]) * mult
                break
        else:
            total += float(part)
    return total


@pytest.fixture(params=sorted(UNITS))
def role(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def unit(role: str) -> Unit:
    return parse_unit(UNITS[role].read_text())


@pytest.fixture(params=sorted(SERVICES))
def service(request: pytest.FixtureRequest) -> Unit:
    """Each service unit (ship, apply, prune), for what all of them share."""
    return parse_unit(SERVICES[str(request.param)].read_text())


def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        msg = ("systemd-analyze is missing (Debian: apt-get install -y systemd, "
               "or bash .ci/install-tools.sh)")
        pytest.fail(msg)  # make install and .ci/run install it; never skipped
    return exe


def verifiable_copy(src: Path, dest_dir: Path) -> Path:
    """The unit with /usr/bin/drstream replaced by this venv's console script."""
    assert VENV_BIN.exists(), f"{VENV_BIN} is missing: pip install -e . first"
    text = src.read_text()
    assert INSTALLED_BIN in text or src.suffix == ".timer"
    dest = dest_dir / src.name  # the name matters: verify checks the unit type by suffix
    dest.write_text(text.replace(INSTALLED_BIN, str(VENV_BIN)))
    return dest


# --------------------------------------------------------------------------- systemd-analyze


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = systemd_analyze()
    copies = [verifiable_copy(p, tmp_path) for p in (*SERVICES.values(), TIMER)]
    res = subprocess.run([exe, "verify", *map(str, copies)], capture_output=True, text=True,
                         timeout=120, check=False)
    # verify reports problems on stderr; some only as warnings with exit 0, so any output
    # about our units fails too.
    ours = [line for line in (res.stdout + res.stderr).splitlines()
            if any(p.name in line for p in copies)]
    assert res.returncode == 0 and not ours, \
        f"systemd-analyze verify exited {res.returncode}:\n{res.stdout}{res.stderr}"


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above is not vacuous: a bad directive value and a missing binary fail."""
    exe = systemd_analyze()
    bad = verifiable_copy(UNITS["ship"], tmp_path)
    bad.write_text(bad.read_text().replace(str(VENV_BIN), "/nonexistent/drstream"))
    res = subprocess.run([exe, "verify", str(bad)], capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode != 0, res.stderr
    assert "/nonexistent/drstream" in res.stderr


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_security_exposure(tmp_path: Path, name: str) -> None:
    exe = systemd_analyze()
    copy = verifiable_copy(SERVICES[name], tmp_path)
    res = subprocess.run(
        [exe, "security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}",
         "--no-pager", str(copy)],
        capture_output=True, text=True, timeout=120, check=False)
    summary = [line for line in res.stdout.splitlines() if "Overall exposure" in line]
    assert res.returncode == 0, (
        f"systemd-analyze security: exposure above {MAX_EXPOSURE}: {summary}\n"
        f"{res.stdout[-3000:]}{res.stderr}")
    assert summary, res.stdout[-2000:]


# --------------------------------------------------------------------------- contract


def test_service_contract(unit: Unit, role: str) -> None:
    s = "Service"
    assert one(unit, s, "Type") == "notify"
    assert one(unit, s, "NotifyAccess") == "main"
    assert seconds(one(unit, s, "WatchdogSec")) == 30
    assert one(unit, s, "Restart") == "on-failure"
    assert one(unit, s, "ExecStart") == f"{INSTALLED_BIN} {role} --config {CONFIG}"
    assert one(unit, s, "ExecReload") == "/bin/kill -HUP $MAINPID"
    # A restart loop stops: both limits set, and a bad config (exit 2) is not retried.
    assert seconds(one(unit, "Unit", "StartLimitIntervalSec")) > 0
    assert int(one(unit, "Unit", "StartLimitBurst")) >= 1
    assert "2" in one(unit, s, "RestartPreventExitStatus").split()
    assert "3" not in one(unit, s, "RestartPreventExitStatus").split()
    assert "network-online.target" in one(unit, "Unit", "After")
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_stop_timeout_exceeds_the_drain_deadline(unit: Unit) -> None:
    stop = seconds(one(unit, "Service", "TimeoutStopSec"))
    assert stop >= DEFAULT_DRAIN_DEADLINE_S + 15, \
        f"TimeoutStopSec={stop:g}s leaves no margin over the {DEFAULT_DRAIN_DEADLINE_S:g}s drain"


def test_user_state_and_credentials(unit: Unit) -> None:
    s = "Service"
    assert one(unit, s, "User") == "drstream"
    assert one(unit, s, "StateDirectory") == "drstream"
    assert one(unit, s, "LoadCredential") == "drstream-k1:/etc/drstream/k1.key"


HARDENING = {
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "UMask": "0077",
}


@pytest.mark.parametrize(("key", "expected"), sorted(HARDENING.items()))
def test_hardening(service: Unit, key: str, expected: str) -> None:
    assert one(service, "Service", key) == expected


def test_syscall_filter(service: Unit) -> None:
    filters = values(service, "Service", "SystemCallFilter")
    assert "@system-service" in filters
    denied = {f for v in filters if v.startswith("~") for f in v[1:].split()}
    assert {"@privileged", "@resources"} <= denied
    assert one(service, "Service", "SystemCallErrorNumber") == "EPERM"


def test_units_differ_only_by_role() -> None:
    """Two units, not a template: everything but the role-specific lines is shared."""
    ship, apply = (parse_unit(UNITS[r].read_text()) for r in ("ship", "apply"))
    role_keys = {"Description", "ExecStart", "SyslogIdentifier", "TimeoutStopSec"}
    for section in ship.keys() | apply.keys():
        a = [kv for kv in ship.get(section, []) if kv[0] not in role_keys]
        b = [kv for kv in apply.get(section, []) if kv[0] not in role_keys]
        assert a == b, f"[{section}] differs between the ship and apply units"


def test_the_units_config_references_a_credential(tmp_path: Path) -> None:
    """The config the units expect (keys by `credential:`) validates; README's example."""
    text = (ROOT / "systemd" / "README.md").read_text()
    start = text.index("```yaml\n") + len("```yaml\n")
    raw = yaml.safe_load(text[start:text.index("```", start)])
    config = parse_config(raw, "systemd/README.md")
    assert config.keyring.keys[config.keyring.active] == "credential:drstream-k1"


# --------------------------------------------------------------------------- restart policy
#
# systemd decides on a restart from the main process's exit status only (service.c,
# service_shall_restart() tests main_exec_status against RestartPreventExitStatus=): a
# failing ExecStartPre= or ExecCondition= is never matched, so a pre-check that fails on a
# bad config is restarted until the start limit. The units therefore have no such command,
# and the ExecStart= command itself must exit 2 on every kind of bad config.


def exec_start(unit: Unit, config: Path) -> list[str]:
    """The unit's ExecStart= as argv, with this venv's drstream and `config`."""
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    assert argv[0] == INSTALLED_BIN and CONFIG in argv, argv
    return [str(VENV_BIN), *(str(config) if a == CONFIG else a for a in argv[1:])]


def dr_config(tmp_path: Path, **changes: object) -> dict[str, object]:
    """A ship+apply config that validates, with Kafka on a port where nothing listens."""
    key = tmp_path / "k1.key"
    if not key.exists():
        generate_key_file(key)
    dead = "127.0.0.1:9"  # discard port: nothing listens on loopback
    raw: dict[str, object] = {
        "log_id": "unit-test",
        "store": {"type": "file", "path": str(tmp_path / "store")},
        "keyring": {"active": "k1", "keys": {"k1": f"file:{key}"}},
        "sources": [{"type": "kafka", "bootstrap_servers": dead, "topics": {"include": [".*"]},
                     "connect_timeout_s": 1}],
        "sinks": [{"type": "kafka", "bootstrap_servers": dead, "connect_timeout_s": 1}],
        "service": {"ship_metrics_listen": None, "apply_metrics_listen": None},
    }
    raw.update(changes)
    return raw


def run_unit_command(unit: Unit, tmp_path: Path, raw: dict[str, object],
                     env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "drstream.yaml"
    path.write_text(yaml.safe_dump(raw))
    clean = {k: v for k, v in os.environ.items()
             if k not in ("CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_USEC")}
    return subprocess.run(exec_start(unit, path), capture_output=True, text=True, timeout=60,
                          env={**clean, **(env or {})}, cwd=tmp_path, check=False)


def test_no_start_command_that_restart_prevention_cannot_see(service: Unit) -> None:
    for key in ("ExecCondition", "ExecStartPre", "ExecStartPost"):
        found = values(service, "Service", key)
        assert all(v.startswith("-") for v in found), (
            f"{key}={found}: its failure is restarted whatever RestartPreventExitStatus= says")


def _readable_key(tmp: Path) -> dict[str, object]:
    key = tmp / "open.key"
    generate_key_file(key)
    key.chmod(0o644)
    return {"keyring": {"active": "k1", "keys": {"k1": f"file:{key}"}}}


BAD_CONFIGS = {
    "unknown key": lambda tmp: {"bogus": 1},
    "key file readable by others": _readable_key,
    "missing key file": lambda tmp: {"keyring": {"active": "k1",
                                                 "keys": {"k1": f"file:{tmp}/nope.key"}}},
    "credential not loaded": lambda tmp: {"keyring": {"active": "k1",
                                                      "keys": {"k1": "credential:drstream-k9"}}},
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_config_stops_the_unit_without_restarts(
        unit: Unit, tmp_path: Path, case: str) -> None:
    (tmp_path / "creds").mkdir()  # as systemd sets it, without the credential the config names
    raw = dr_config(tmp_path, **BAD_CONFIGS[case](tmp_path))
    res = run_unit_command(unit, tmp_path, raw,
                           env={"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")})
    prevented = one(unit, "Service", "RestartPreventExitStatus").split()
    assert str(res.returncode) in prevented, (
        f"{case}: ExecStart exited {res.returncode}, which systemd restarts "
        f"(RestartPreventExitStatus={prevented})\n{res.stderr[-2000:]}")
    assert "Traceback" not in res.stderr, res.stderr


def test_a_runtime_failure_is_restarted(unit: Unit, tmp_path: Path) -> None:
    """An unreachable cluster is ridden out for the outage budget (here 2 s), then it is a
    runtime failure: exit 3, which Restart=on-failure restarts."""
    raw = dr_config(tmp_path)
    raw["service"] = {**raw["service"], "outage_budget_s": 2}  # type: ignore[dict-item]
    res = run_unit_command(unit, tmp_path, raw)
    assert res.returncode == 3, f"exit {res.returncode}\n{res.stderr[-2000:]}"
    assert one(unit, "Service", "Restart") == "on-failure"
    assert "3" not in one(unit, "Service", "RestartPreventExitStatus").split()


# --------------------------------------------------------------------------- prune timer


def test_prune_service_contract() -> None:
    unit = parse_unit(PRUNE.read_text())
    s = "Service"
    assert one(unit, s, "Type") == "oneshot"
    argv = shlex.split(one(unit, s, "ExecStart"))
    assert argv[:4] == [INSTALLED_BIN, "prune", "--config", CONFIG], argv
    args = build_parser(installed()).parse_args(argv[1:])  # exits 2 (SystemExit) on a bad option
    assert parse_duration_s(args.older_than) >= 86400, "retention under a day"
    assert not args.dry_run
    assert one(unit, s, "User") == "drstream"
    assert one(unit, s, "StateDirectory") == "drstream"
    # the key: gap checks read a manifest, blob garbage collection decodes segments
    assert one(unit, s, "LoadCredential") == "drstream-k1:/etc/drstream/k1.key"
    assert not values(unit, s, "Restart"), "a failed run waits for the next timer"
    assert not values(unit, "Install", "WantedBy"), "started by its timer, not at boot"


def test_prune_timer(tmp_path: Path) -> None:
    timer = parse_unit(TIMER.read_text())
    calendar = one(timer, "Timer", "OnCalendar")
    res = subprocess.run([systemd_analyze(), "calendar", calendar], capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert one(timer, "Timer", "Unit") == PRUNE.name
    assert one(timer, "Timer", "Persistent") == "true"
    assert one(timer, "Install", "WantedBy") == "timers.target"
    # a run that hangs is ended before the next one is due
    timeout = seconds(one(parse_unit(PRUNE.read_text()), "Service", "TimeoutStartSec"))
    assert timeout < CALENDAR_PERIOD_S[calendar], (timeout, calendar)


# --------------------------------------------------------------------------- shard templates
#
# drstream-ship@.service and drstream-apply@.service run one shard of a log set each
# (instance = shard index, docs/shards.md). They are the plain units line for line but
# for the shard: a hardening or timeout change to one that misses the other fails here.

TEMPLATE_KEYS = {"Description", "ExecStart", "SyslogIdentifier"}


@pytest.mark.parametrize("role", sorted(UNITS))
def test_template_is_the_plain_unit_with_a_shard(role: str) -> None:
    plain, template = parse_unit(UNITS[role].read_text()), parse_unit(TEMPLATES[role].read_text())
    for section in plain.keys() | template.keys():
        a = [kv for kv in plain.get(section, []) if kv[0] not in TEMPLATE_KEYS]
        b = [kv for kv in template.get(section, []) if kv[0] not in TEMPLATE_KEYS]
        assert a == b, f"[{section}] of {TEMPLATES[role].name} differs from {UNITS[role].name}"
    s = "Service"
    assert one(template, s, "ExecStart") == f"{one(plain, s, 'ExecStart')} --shard %i"
    assert one(template, s, "SyslogIdentifier") == f"drstream-{role}@%i"
    assert "%i" in one(template, "Unit", "Description")


def instance(template: Unit, k: str) -> Unit:
    """The template as systemd instantiates it for instance `k` (%i expanded)."""
    return {section: [(key, v.replace("%i", k)) for key, v in kvs]
            for section, kvs in template.items()}


@pytest.mark.parametrize("role", sorted(UNITS))
def test_template_instance_selects_the_shard(role: str, tmp_path: Path) -> None:
    """Instance K runs shard K of the config's set; an instance past the set's count is a
    usage error (exit 2: not restarted) naming --shard; K of a set of one is refused too."""
    template = parse_unit(TEMPLATES[role].read_text())
    raw = dr_config(tmp_path, shards={"count": 3})
    raw["service"] = {**raw["service"], "outage_budget_s": 1}  # type: ignore[dict-item]
    res = run_unit_command(instance(template, "3"), tmp_path, raw)
    assert res.returncode == 2, res.stderr
    assert "--shard" in res.stderr and "K is 0 .. 2" in res.stderr, res.stderr
    res = run_unit_command(instance(template, "2"), tmp_path, raw)
    assert res.returncode == 3, res.stderr  # the shard starts, then its cluster is down
    assert "Traceback" not in res.stderr, res.stderr
