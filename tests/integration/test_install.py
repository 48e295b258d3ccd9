"""The wheel installs drstream under its own name, `drstream.daemon` and
`drstream.connectors`, so it shares one environment with python-daemon (a common package,
which installs a top-level `daemon`). Built and installed into a fresh virtualenv, run
from outside the checkout so nothing of the source tree is on the path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYTHON_DAEMON = "python-daemon>=3.0"

pytestmark = pytest.mark.integration


def run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, (f"{' '.join(args)} exited {res.returncode}\n"
                                 f"stdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}")
    return res


@pytest.mark.timeout(900)
def test_drstream_and_python_daemon_share_a_fresh_virtualenv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    py, drstream = venv / "bin" / "python", venv / "bin" / "drstream"
    run([str(py), "-m", "pip", "install", "-q", str(ROOT), PYTHON_DAEMON], tmp_path,
        timeout=800)

    probe = ("import daemon, drstream.daemon.cli, drstream.connectors.kafka\n"
             "print(daemon.DaemonContext.__module__, daemon.__file__)\n"
             "print(drstream.daemon.cli.__file__)\n")
    lines = run([str(py), "-c", probe], tmp_path).stdout.splitlines()
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" \
        / "site-packages"
    assert lines[0].split() == ["daemon.daemon", str(site / "daemon" / "__init__.py")], lines
    assert lines[1] == str(site / "drstream" / "daemon" / "cli.py"), lines

    helped = run([str(drstream), "--help"], tmp_path).stdout
    for command in ("validate", "ship", "apply", "verify", "replay", "drill", "prune"):
        assert command in helped, helped

    key = tmp_path / "k1.key"
    run([str(drstream), "keys", "generate", str(key)], tmp_path)
    config = tmp_path / "drstream.yaml"
    config.write_text(f"log_id: east-1\nstore: {{type: file, path: {tmp_path / 'log'}}}\n"
                      f"keyring: {{active: k1, keys: {{k1: 'file:{key}'}}}}\n")
    validated = run([str(drstream), "validate", str(config), "--check-keys"], tmp_path).stdout
    assert "ok (log_id east-1, store file)" in validated, validated
