"""The operating guides cannot rot: every `drstream` command line and every config key they
name exists in today's command-line parser and config model.

- Command lines in code blocks (a command whose first word is `drstream` or a path ending
  in `bin/drstream`, as in a unit's `ExecStart=`) must parse with `build_parser(installed())`.
- Inline mentions (`drstream verify --deep`) must name a real command and only options
  that command has (values may be left out).
- YAML blocks: a whole config (one with `log_id`) must pass `parse_config`; a fragment's
  keys must all exist at their place in the model.
- Inline key paths (`ship.heartbeat_interval_s`, `sources[].skip_origins`) must resolve in
  the model; inline `key: value` snippets and bare snake_case words in backticks must be
  a config key somewhere, unless listed in NOT_CONFIG_KEYS (report fields and the like).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from drstream.daemon.cli import build_parser
from drstream.daemon.config import Config, parse_config
from drstream.daemon.plugins import installed

ROOT = Path(__file__).resolve().parents[2]
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "systemd" / "README.md",
        ROOT / "monitoring" / "README.md"]
# The byte format's spec names code and format fields, not config keys.
SPEC = ROOT / "docs" / "format.md"
TOP_KEYS = tuple(Config.model_fields)
# snake_case words in backticks that are not config keys: report and header fields,
# metric label values, Kafka broker settings.
NOT_CONFIG_KEYS = {"at_ms", "records_not_replicated", "key_id", "source_offsets_lost",
                   "config_reload_rejected", "bad_signature", "group_left", "group_right",
                   "auto.offset.reset", "rpo_s", "applied_seq", "handover_waiting",
                   "s3_notifications_unreachable", "s3_notifications_connected"}

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
SHELL_OPERATORS = {"|", "||", "&", "&&", ";", ">", ">>", "<"}


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def blocks(path: Path) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(path.read_text())]


def prose(path: Path) -> str:
    """The text outside code blocks."""
    return FENCE.sub("", path.read_text())


def inline_codes(path: Path) -> list[str]:
    return re.findall(r"`([^`\n]+)`", prose(path))


# --------------------------------------------------------------------------- commands


def command_lines(text: str) -> list[list[str]]:
    """argv (after `drstream`) of every drstream command in shell or unit-file lines."""
    found = []
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";|&<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words = list(lexer)
        command: list[str] = []
        for word in [*words, ";"]:
            if word not in SHELL_OPERATORS:
                command.append(word)
                continue
            # leading `sudo` and VAR=value assignments (a unit's ExecStart= is no assignment)
            while command and (command[0] == "sudo" or re.match(r"^[A-Z_]+=(?!/)", command[0])):
                command.pop(0)
            if command and (command[0] == "drstream" or command[0].endswith("bin/drstream")):
                found.append(command[1:])
            command = []
    return found


def parse(argv: list[str]) -> argparse.Namespace:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser(installed()).parse_args(argv)
    except SystemExit:
        pytest.fail(f"`drstream {shlex.join(argv)}` does not parse: {err.getvalue().strip()}")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def check_mention(text: str) -> None:
    """`drstream CMD [SUB] [--opt [value]]...`: the command and each option exist."""
    words = text.split()[1:]
    parser = build_parser(installed())
    if not words or words[0].startswith("-"):
        options = parser._option_string_actions
    else:
        for name in words[0].split("|"):  # `drstream ship|apply`
            assert name in subcommands(parser), f"`{text}`: no command {name!r}"
        sub = subcommands(parser)[words[0].split("|")[0]]
        if len(words) > 1 and subcommands(sub):
            assert words[1] in subcommands(sub), f"`{text}`: no command {words[1]!r}"
            sub = subcommands(sub)[words[1]]
        options = sub._option_string_actions
    for word in words:
        if word.startswith("--"):
            option = word.split("=", 1)[0]
            assert option in options, f"`{text}`: no option {option}"


@pytest.mark.parametrize("path", DOCS, ids=doc_id)
def test_command_lines_parse(path: Path) -> None:
    for lang, body in blocks(path):
        if lang in ("yaml", "json"):
            continue
        for argv in command_lines(body):
            parse(argv)


@pytest.mark.parametrize("path", DOCS, ids=doc_id)
def test_inline_commands_exist(path: Path) -> None:
    for code in inline_codes(path):
        if re.match(r"drstream\s", code):
            check_mention(code)


# --------------------------------------------------------------------------- config keys


def _connector_models(key: str) -> list[type[BaseModel]]:
    connectors = installed()
    registry: dict[str, Any] = {"store": connectors.stores, "sources": connectors.sources,
                                "sinks": connectors.sinks}[key]
    return [t.config_model for t in registry.values()]


def _inner(annotation: Any) -> tuple[list[type[BaseModel]], bool]:
    """(models inside an annotation, whether a free mapping key comes first)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation], False
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is dict:
        models, _ = _inner(args[1])
        return models, True
    models: list[type[BaseModel]] = []
    mapping = False
    if origin in (list, Union, types.UnionType):
        for arg in args:
            found, free = _inner(arg)
            models += found
            mapping = mapping or free
    return models, mapping


def resolve(path: str) -> None:
    """Fail unless a dotted key path (`a.b[].c`, `keyring.keys.k2`) is in the model."""
    parts = [p.removesuffix("[]") for p in path.split(".")]
    models: list[type[BaseModel]] = [Config]
    free_key = False
    for i, part in enumerate(parts):
        if free_key:  # a mapping's own key (a key id, a property name)
            free_key = False
            continue
        owners = [m for m in models if part in m.model_fields]
        assert owners, f"config key {'.'.join(parts[:i + 1])!r} does not exist ({path})"
        if i == 0 and part in ("store", "sources", "sinks"):
            models = _connector_models(part)
            continue
        models, free_key = [], False
        for owner in owners:
            found, free = _inner(owner.model_fields[part].annotation)
            models += found
            free_key = free_key or free
        if not models and not free_key and i < len(parts) - 1:
            raise AssertionError(f"config key {path!r}: {part!r} has no keys below it")


def all_field_names() -> set[str]:
    names: set[str] = set()
    todo: list[type[BaseModel]] = [Config, *(m for k in ("store", "sources", "sinks")
                                             for m in _connector_models(k))]
    seen: set[type[BaseModel]] = set()
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            names.add(name)
            todo += _inner(field.annotation)[0]
    return names


def key_paths(data: Any, prefix: str = "") -> list[str]:
    """Every key path in a YAML document (lists as `[]`)."""
    out = []
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            out.append(path)
            out += key_paths(value, path)
    elif isinstance(data, list):
        for item in data:
            out += key_paths(item, f"{prefix}[]")
    return out


@pytest.mark.parametrize("path", DOCS, ids=doc_id)
def test_yaml_blocks_are_real_config(path: Path) -> None:
    for lang, body in blocks(path):
        if lang != "yaml":
            continue
        data = yaml.safe_load(body)
        if isinstance(data, dict) and "log_id" in data:
            parse_config(data, f"{doc_id(path)} yaml block")  # raises listing every problem
        for key in key_paths(data):
            resolve(key)


INLINE_PATH = re.compile(rf"^(?:{'|'.join(TOP_KEYS)})(?:\[\])?(?:\.\w+(?:\[\])?)+$")


@pytest.mark.parametrize("path", [d for d in DOCS if d != SPEC], ids=doc_id)
def test_inline_config_keys_exist(path: Path) -> None:
    known = all_field_names()
    for code in inline_codes(path):
        if INLINE_PATH.match(code):
            resolve(code)
            continue
        snippet = re.match(r"^([a-z][a-z0-9_]*): ", code)
        word = snippet.group(1) if snippet else code
        if re.fullmatch(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)+", word) and \
                not word.startswith(("drstream_", "process_")):
            assert word in known or word in NOT_CONFIG_KEYS, \
                f"{doc_id(path)}: `{code}` is not a config key"


# --------------------------------------------------------------------------- the checks fail


def test_the_checks_catch_rot() -> None:
    """Each check fails on what it guards against."""
    with pytest.raises(pytest.fail.Exception):
        parse(["prune", "--config", "c.yaml", "--older"])
    with pytest.raises(AssertionError):
        check_mention("drstream benchmark --config F")
    with pytest.raises(AssertionError):
        check_mention("drstream verify --deeper")
    with pytest.raises(AssertionError):
        resolve("ship.heartbeat_interval")
    with pytest.raises(AssertionError):
        resolve("sources[].skip_origin")
    resolve("keyring.keys.k2")
    resolve("store.object_lock.retain_days")
    assert command_lines("sudo drstream status --config /c.yaml | jq .  # x") == \
        [["status", "--config", "/c.yaml"]]
    assert command_lines("ExecStart=/usr/bin/drstream ship --config /c.yaml") == \
        [["ship", "--config", "/c.yaml"]]
    assert command_lines("ln -s /opt/drstream/bin/drstream /usr/bin/drstream") == []
