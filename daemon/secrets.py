"""Secret references: `env:NAME`, `file:/path`, `credential:NAME` (systemd LoadCredential).

Config files name where a secret lives, never the secret itself, so a config can be
printed, diffed and logged. Values are resolved only when they are used, by this module
alone, with one rule per kind of reference:

  env:NAME          the environment variable NAME
  file:/path        the regular file at /path
  credential:NAME   the regular file $CREDENTIALS_DIRECTORY/NAME (LoadCredential=NAME:...)

A file or credential that group or others may read or write (mode & 0o077) is refused:
systemd hands credentials over with mode 0400, so only a secret that leaked fails. Errors
name the reference (path, variable), never the content.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Final

from drstream.daemon.errors import HIDDEN, ConfigFieldError, DrstreamError

CREDENTIAL_NAME: Final = r"[A-Za-z0-9._@:-]{1,255}"
SECRET_REF_RE = re.compile(
    rf"^(env:[A-Za-z_][A-Za-z0-9_]*|file:/.+|credential:{CREDENTIAL_NAME})$")
SECRET_REF_HELP = "a secret reference: env:NAME, file:/absolute/path or credential:NAME"
SCHEMES: Final = ("file:", "env:", "credential:")
# A secret is a key, a password or a token: one line. More than this is not a secret file.
DEFAULT_MAX_BYTES: Final = 1 << 20


class SecretError(DrstreamError):
    """A secret reference that cannot be resolved; the message names the reference's
    target (file, variable), never a value."""


def is_secret_ref(value: str) -> bool:
    return bool(SECRET_REF_RE.match(value))


def check_private_mode(path: str | Path, mode: int) -> None:
    """Refuse files that group or others may read or write (keys, passwords)."""
    mode = stat.S_IMODE(mode)
    if mode & 0o077:
        raise SecretError(
            f"{path} has mode {mode:04o}; secrets must not be readable by group or others "
            f"(chmod 600 {path})"
        )


def _read_private_file(path: str, max_bytes: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise SecretError(f"file {path} does not exist") from None
    except OSError as e:
        raise SecretError(f"cannot open {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretError(f"{path} is not a regular file")
        check_private_mode(path, st.st_mode)
        chunks, size = [], 0
        while chunk := os.read(fd, max_bytes + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise SecretError(f"{path} is too large to be a secret file")
        return b"".join(chunks)
    except OSError as e:
        raise SecretError(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def resolve(ref: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The raw bytes `ref` names; SecretError says why not."""
    if not isinstance(ref, str):
        raise SecretError(f"a secret reference must be a string, got {type(ref).__name__}")
    kind, sep, name = ref.partition(":")
    if kind == "env" and sep:
        if not name:
            raise SecretError(f"reference {ref!r} names no environment variable")
        value = os.environ.get(name)
        if value is None:
            raise SecretError(f"environment variable {name} is not set")
        return value.encode("utf-8", "surrogateescape")
    if kind == "file" and sep:
        if not name:
            raise SecretError(f"reference {ref!r} names no file")
        return _read_private_file(name, max_bytes)
    if kind == "credential" and sep:
        if not re.fullmatch(CREDENTIAL_NAME, name) or name in (".", ".."):
            raise SecretError(f"reference {ref!r}: invalid credential name {name!r}")
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise SecretError(
                "environment variable CREDENTIALS_DIRECTORY is not set (systemd sets it when "
                f"the unit has LoadCredential={name}:...; from a shell, give the file with "
                f"--credential {name}=file:/path, or a key with --key ID=file:/path)")
        return _read_private_file(os.path.join(directory, name), max_bytes)
    # Never echo it: a value that is not a reference may be the secret itself.
    raise SecretError("not a secret reference (value hidden: it may be the secret itself); "
                      "valid forms are " + ", ".join(f"{s}..." for s in SCHEMES))


def check_file(ref: str) -> None:
    """For a `file:` reference, what can be checked without reading the secret: the file
    exists, is a regular file and only its owner may read it. Other kinds pass (they
    resolve only where the service runs)."""
    kind, _, path = ref.partition(":")
    if kind != "file" or not path:
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SecretError(f"file {path} does not exist") from None
    except OSError as e:
        raise SecretError(f"cannot stat {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SecretError(f"{path} is not a regular file")
    check_private_mode(path, st.st_mode)


def read_secret_bytes(ref: str, field: str) -> bytes:
    """Resolve `ref` for config field `field`; errors name the field and the reference."""
    try:
        return resolve(ref)
    except SecretError as e:
        shown = ref if ref.startswith(SCHEMES) else HIDDEN
        raise ConfigFieldError(field, shown, f"cannot read secret: {e}") from e


def read_secret(ref: str, field: str) -> str:
    """Text secret with surrounding whitespace (a file's trailing newline) removed."""
    return read_secret_bytes(ref, field).decode().strip()
