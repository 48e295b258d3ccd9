"""Metric names in PromQL expressions, for checking monitoring/ against what ship and apply
really export.

A strict tokenizer, not a full parser: it knows which identifiers are not metric names
(functions and aggregations, which a `(` or `by`/`without` follows; keywords; the label
lists after by/without/on/ignoring/group_left/group_right; label names inside `{}`;
everything in `[]`) and refuses any character PromQL does not have, so an expression it
cannot read fails the test instead of yielding a short list. Grafana variables are
replaced first (`grafana_expr`).
"""

from __future__ import annotations

import re

TOKEN = re.compile(r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+)(?![A-Za-z0-9_:])
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=(){}\[\],:@])
""", re.VERBOSE)

# Words that are never metric names where they stand (PromQL keywords are case-insensitive).
KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end"}
# These take an optional parenthesised list of label names, which are not metric names.
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
# Grafana's own interval variables: any valid duration will do for the names.
GRAFANA_INTERVALS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}


class PromQLError(ValueError):
    pass


def tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if m is None:
            raise PromQLError(f"cannot read {expr[pos:pos + 20]!r} at {pos} in {expr!r}")
        kind = m.lastgroup
        assert kind is not None
        if kind != "space":
            out.append((kind, m.group()))
        pos = m.end()
    return out


def _skip_group(toks: list[tuple[str, str]], i: int, open_: str, close: str) -> int:
    """Index just past the bracket group opening at toks[i]."""
    depth = 0
    for j in range(i, len(toks)):
        if toks[j] == ("op", open_):
            depth += 1
        elif toks[j] == ("op", close):
            depth -= 1
            if depth == 0:
                return j + 1
    raise PromQLError(f"unbalanced {open_!r}")


def _matcher_names(toks: list[tuple[str, str]], start: int, end: int) -> set[str]:
    """Metric names given as {__name__="..."} inside a label matcher list."""
    names = set()
    for j in range(start, end - 2):
        if toks[j] == ("ident", "__name__"):
            op, value = toks[j + 1], toks[j + 2]
            if op != ("op", "=") or value[0] != "string":
                raise PromQLError("only __name__=\"...\" is supported for metric names")
            names.add(value[1][1:-1])
    return names


def metric_names(expr: str) -> set[str]:
    """Every metric name an expression selects."""
    toks = tokens(expr)
    if toks.count(("op", "(")) != toks.count(("op", ")")):
        raise PromQLError(f"unbalanced parentheses in {expr!r}")
    names: set[str] = set()
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else ("", "")
        if (kind, text) == ("op", "{"):
            end = _skip_group(toks, i, "{", "}")
            names |= _matcher_names(toks, i + 1, end)
            i = end
        elif (kind, text) == ("op", "["):
            i = _skip_group(toks, i, "[", "]")
        elif kind == "ident" and text.lower() in GROUPING:
            i = _skip_group(toks, i + 1, "(", ")") if nxt == ("op", "(") else i + 1
        elif kind == "ident" and (text.lower() in KEYWORDS or nxt == ("op", "(")
                                  or (text in AGGREGATIONS and nxt[1].lower() in GROUPING)):
            i += 1
        elif kind == "ident":
            names.add(text)
            i += 1
        else:
            i += 1
    return names


def grafana_expr(expr: str, variables: dict[str, str]) -> str:
    """A Grafana panel query with its variables ($name, ${name}) replaced by values."""
    values = {**GRAFANA_INTERVALS, **variables}

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise PromQLError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)
