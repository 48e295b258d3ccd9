"""Secret references: `env:NAME`, `file:/path`, `credential:NAME` (systemd LoadCredential).

Config files name where a secret lives, never the secret itself, so a config can be
printed, diffed and logged. Values are resolved only when a connector opens.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from daemon.errors import ConfigFieldError

SECRET_REF_RE = re.compile(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:/.+|credential:[A-Za-z0-9._-]+)$")
SECRET_REF_HELP = "a secret reference: env:NAME, file:/absolute/path or credential:NAME"


def is_secret_ref(value: str) -> bool:
    return bool(SECRET_REF_RE.match(value))


def check_private_file(path: Path) -> None:
    """Refuse files that group or others may read or write (keys, passwords)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(
            f"{path} has mode {mode:04o}; secrets must not be readable by group or others "
            f"(chmod 600 {path})"
        )


def read_secret_bytes(ref: str, field: str) -> bytes:
    """Resolve `ref` to its raw bytes; errors name the field and the reference, never a value."""
    kind, _, name = ref.partition(":")
    try:
        if kind == "env":
            if name not in os.environ:
                raise LookupError(f"environment variable {name} is not set")
            return os.environ[name].encode()
        if kind == "file":
            path = Path(name)
            check_private_file(path)
            return path.read_bytes()
        if kind == "credential":
            creds = os.environ.get("CREDENTIALS_DIRECTORY")
            if not creds:
                raise LookupError("CREDENTIALS_DIRECTORY is not set (not run by systemd?)")
            path = Path(creds) / name
            check_private_file(path)
            return path.read_bytes()
    except (OSError, LookupError) as e:
        raise ConfigFieldError(field, ref, f"cannot read secret: {e}") from e
    raise ConfigFieldError(field, ref, f"not {SECRET_REF_HELP}")


def read_secret(ref: str, field: str) -> str:
    """Text secret with surrounding whitespace (a file's trailing newline) removed."""
    return read_secret_bytes(ref, field).decode().strip()
