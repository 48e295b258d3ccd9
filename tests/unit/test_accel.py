"""The compiled body decoder (daemon/_ccodec.c) against the pure-Python reference.

Equal results and identical errors (class, message, cause) on generated bodies, on
mutations of them, on targeted corruptions of every column, and on the edge where the
reference's Python slicing clamps at the end of the body. Where the compiled part is
missing (not built, hidden, or DRSTREAM_NO_ACCEL=1) the pure-Python path runs.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from drstream.daemon import accel
from drstream.daemon.accel import ProduceBatch
from drstream.daemon.codec import (
    Body,
    EventBatch,
    KafkaBatch,
    KafkaRecord,
    encode_body,
    make_manifest,
)
from drstream.daemon.errors import SegmentFormatError
from tests.unit.both_decoders import (
    OFFSET_HEADER,
    TAIL,
    compiled,
    compiled_produce,
    decode_body,
    outcome,
    reference_produce,
)
from tests.unit.test_codec import bodies
from tests.unit.test_segment_fuzz import mutated

ROOT = Path(__file__).resolve().parents[2]
PROPERTY = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def agree(data: bytes) -> tuple[Any, ...]:
    """Assert both decoders (both forms) agree on data; the reference's outcome."""
    result = outcome(decode_body, data)
    assert result[0] == "ok" or result[1] is SegmentFormatError, result
    return result


def test_compiled_decoder_is_in_use() -> None:
    assert accel.COMPILED, "the compiled decoder is built here, so accel must use it"
    body = _record_body([KafkaRecord(1, 2, 1, b"k", b"v", [("h", b"x")])])
    assert accel.decode_body(encode_body(body)) == body


# --------------------------------------------------------------------------- valid bodies


@PROPERTY
@given(bodies())
def test_generated_bodies_decode_equal(body: Body) -> None:
    data = encode_body(body)
    assert compiled(data) == body
    assert compiled_produce(data) == reference_produce(body)
    tail = (("a", None), ("b", b""))
    assert compiled_produce(data, tail, None) == reference_produce(body, tail, None)


def _record_body(records: list[KafkaRecord], topic: str = "t") -> Body:
    batches: list[KafkaBatch | EventBatch] = [KafkaBatch("kafka:primary", topic, 7, records)]
    return Body(make_manifest({}, batches), batches)


def test_produce_form() -> None:
    records = [
        KafkaRecord(41, 1_700_000_000_000, 1, b"k", b"v", [("trace", b"1")]),
        KafkaRecord(42, -1, 0, None, None, []),
    ]
    body = _record_body(records)
    body.batches.append(KafkaBatch("kafka:primary", "empty", 0, []))
    tail = (("drstream.origin", b"eu"),)
    manifest, batches = accel.decode_produce(encode_body(body), tail, "drstream.offset")
    assert manifest == body.manifest
    assert batches == [
        ProduceBatch(
            "kafka:primary", "t", 7, 42, [1_700_000_000_000, 0], [b"k", None], [b"v", None],
            [[("trace", b"1"), ("drstream.origin", b"eu"), ("drstream.offset", b"41")],
             [("drstream.origin", b"eu"), ("drstream.offset", b"42")]],
        ),
        ProduceBatch("kafka:primary", "empty", 0, None, [], [], [], []),
    ]


@pytest.mark.parametrize("offset", [0, 1, 9, 10, -1, -10, 2**63 - 1, -(2**63), 1234567890123])
def test_offset_header_digits(offset: int) -> None:
    body = _record_body([KafkaRecord(offset, 0, 1, None, None, [])])
    [batch] = compiled_produce(encode_body(body))
    assert batch.headers == [[*TAIL, (OFFSET_HEADER, b"%d" % offset)]]


def test_many_distinct_and_long_header_keys() -> None:
    """More distinct keys than the compiled decoder shares str objects for, and keys past
    its cache length, in every order."""
    keys = [f"k{i}" for i in range(20)] + ["x" * 64, "y" * 65, "ü" * 40, ""]
    records = [KafkaRecord(i, i, 1, None, b"v", [(keys[(i * 7 + j) % len(keys)], b"%d" % j)
                                                 for j in range(i % 6)])
               for i in range(300)]
    body = _record_body(records)
    data = encode_body(body)
    assert agree(data) == ("ok", body)


def test_large_values() -> None:
    big = bytes(range(256)) * 8192  # 2 MiB
    body = _record_body([KafkaRecord(0, 1, 1, big, big[:-1], [("h", big[1:])])])
    assert agree(encode_body(body)) == ("ok", body)


# --------------------------------------------------------------------------- corrupted


def kafka_columns(data: bytes) -> list[dict[str, tuple[int, int, int]]]:
    """Per Kafka section: field -> (byte offset, entries, bytes per entry)."""
    (mlen,) = struct.unpack_from("<I", data, 0)
    pos, out = 4 + mlen, []
    while pos < len(data):
        kind, plen = struct.unpack_from("<BQ", data, pos)
        pos += 9
        if kind == 1:
            p = pos
            for _ in range(2):  # stream, topic
                p += 2 + struct.unpack_from("<H", data, p)[0]
            _, n, nh = struct.unpack_from("<iII", data, p)
            cols = {"stream_len": (pos, 1, 2), "partition": (p, 1, 4), "n": (p + 4, 1, 4),
                    "nh": (p + 8, 1, 4)}
            p += 12
            for name, count, width in (("offsets", n, 8), ("timestamps", n, 8),
                                       ("key_lens", n, 4), ("value_lens", n, 4),
                                       ("header_counts", n, 4), ("hkey_lens", nh, 4),
                                       ("hval_lens", nh, 4), ("ts_types", n, 1)):
                cols[name] = (p, count, width)
                p += count * width
            out.append(cols)
        pos += plen
    return out


INTERESTING = [-(2**31), -(2**31) + 1, -1000, -3, -2, -1, 0, 1, 2, 3, 127, 128, 255, 256,
               65535, 2**31 - 1, 2**31, 2**32 - 1]


@st.composite
def column_corruptions(draw: st.DrawFn) -> bytes:
    """A generated body with Kafka records, 1-3 column entries overwritten with edge values
    (negative, -1, off by one, huge): this reaches every check behind the column bounds."""
    body = draw(bodies())
    data = bytearray(encode_body(body))
    sections = kafka_columns(bytes(data))
    assume(sections)
    for _ in range(draw(st.integers(1, 3))):
        cols = draw(st.sampled_from(sections))
        name = draw(st.sampled_from(sorted(c for c, (_, count, _) in cols.items() if count)))
        start, count, width = cols[name]
        at = start + width * draw(st.integers(0, count - 1))
        if width == 1:
            data[at] = draw(st.integers(0, 255))
        elif width == 2:
            struct.pack_into("<H", data, at, draw(st.integers(0, 65535)))
        elif width == 4:
            v = draw(st.sampled_from(INTERESTING) | st.integers(-(2**31), 2**32 - 1))
            struct.pack_into("<i" if v < 0 else "<I", data, at, v)
        else:
            struct.pack_into("<q", data, at, draw(st.integers(-(2**63), 2**63 - 1)))
    return bytes(data)


@PROPERTY
@given(column_corruptions())
def test_column_corruptions_agree(data: bytes) -> None:
    agree(data)


@PROPERTY
@given(st.data())
def test_mutated_generated_bodies_agree(data: st.DataObject) -> None:
    agree(data.draw(mutated(encode_body(data.draw(bodies())))))


@PROPERTY
@given(bodies(), st.integers(0, 2**16))
def test_every_truncation_point_agrees(body: Body, cut: int) -> None:
    data = encode_body(body)
    agree(data[: cut % (len(data) + 1)])


def _negative_header_value(keys: list[str], first_value: bytes) -> bytes:
    """The last header's value length set to -60 and its key's length raised by 60: the
    lengths still add up, but that key now runs 60 bytes past the end of the body, where
    the reference's slice clamps it (keeping the header values that end the body)."""
    headers = [(k, first_value if i == 0 else b"") for i, k in enumerate(keys)]
    records = [KafkaRecord(0, 1, 1, b"k" * 50, b"v" * 50, headers)]
    data = bytearray(encode_body(_record_body(records)))
    cols = kafka_columns(bytes(data))[0]
    last = len(keys) - 1
    struct.pack_into("<i", data, cols["hval_lens"][0] + 4 * last, -60)
    struct.pack_into("<I", data, cols["hkey_lens"][0] + 4 * last, len(keys[-1].encode()) + 60)
    return bytes(data)


@pytest.mark.parametrize(("keys", "first_value", "expect"), [
    (["a", "b"], b"", "negative length in a column"),  # clamped keys are ASCII
    (["a", "b"], b"\xc3", "header key is not valid UTF-8"),  # clamped key ends in a lead byte
    (["\u00e9", "b"], b"\xc3\xa9", "negative length in a column"),  # clamped key is UTF-8
    (["\u00e9", "b"], b"\xff", "header key is not valid UTF-8"),
])
def test_header_keys_past_the_end_are_read_like_the_reference(
        keys: list[str], first_value: bytes, expect: str) -> None:
    result = agree(_negative_header_value(keys, first_value))
    assert result[0] == "error" and expect in result[2], result


def _replace_manifest(data: bytes, **changes: Any) -> bytes:
    """data with fields of its manifest changed (the encoder refuses a wrong manifest)."""
    (mlen,) = struct.unpack_from("<I", data, 0)
    doc = {**json.loads(data[4 : 4 + mlen]), **changes}
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return struct.pack("<I", len(raw)) + raw + data[4 + mlen :]


@pytest.mark.parametrize("order", [[5, 7, 6], [7, 6, 5], [6, 5, 7], [5, 6, 7], [6, 6, 6]])
@pytest.mark.parametrize(("lo", "hi"), [(5, 7), (6, 7), (5, 6), (4, 8), (-1, 7), (6, 6)])
def test_manifest_bounds_at_the_edges(order: list[int], lo: int, hi: int) -> None:
    """Whether the manifest covers the records depends on the bounds both decoders
    compute from the timestamps: one off at either end must be refused by both."""
    body = _record_body([KafkaRecord(i, ts, 1, None, None, []) for i, ts in enumerate(order)])
    data = _replace_manifest(encode_body(body), min_timestamp_ms=lo, max_timestamp_ms=hi)
    result = agree(data)
    covered = lo <= min(order) and max(order) <= hi
    assert (result[0] == "ok") == covered, (order, lo, hi, result)


def test_errors_name_the_same_thing() -> None:
    """Spot checks that the messages name the field (the property tests compare all)."""
    body = _record_body([KafkaRecord(1, 2, 1, b"key", b"value", [("h\u00e9", b"x")])])
    data = bytearray(encode_body(body))
    cols = kafka_columns(bytes(data))[0]
    cases = {
        "timestamp type out of range": (cols["ts_types"][0], b"\x03"),
        "header counts sum to 2": (cols["header_counts"][0], struct.pack("<I", 2)),
        "its columns describe": (cols["key_lens"][0], struct.pack("<i", 4)),
        "stream is not valid UTF-8": (cols["stream_len"][0] + 2, b"\xff"),
    }
    for expect, (at, raw) in cases.items():
        broken = bytearray(data)
        broken[at : at + len(raw)] = raw
        result = agree(bytes(broken))
        assert result[0] == "error" and expect in result[2], (expect, result)


def test_no_memory_is_kept() -> None:
    """Decoding (and failing) many times leaves nothing behind: one object leaked per
    record would keep megabytes here, one per call about 100 KiB."""
    headers: list[tuple[str, bytes | None]] = [("h", b"x"), ("u\u00e9", None)]
    body = _record_body([KafkaRecord(i, i, 1, b"k%d" % i, b"v" * 100, headers)
                         for i in range(100)])
    good = encode_body(body)
    bad = bytearray(good)
    bad[kafka_columns(good)[0]["ts_types"][0]] = 9

    def rounds(n: int) -> None:
        for _ in range(n):
            compiled(good)
            compiled_produce(good)
            for fn in (compiled, compiled_produce):
                with pytest.raises(SegmentFormatError):
                    fn(bytes(bad))

    def kept() -> int:
        # The manifest's JSON decoder keeps caches of its own (not growing with rounds).
        gc.collect()
        snap = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, "*/json/*")])
        return sum(s.size for s in snap.statistics("filename"))

    rounds(10)
    tracemalloc.start()
    try:
        before = kept()
        rounds(2000)
        grown = kept() - before
    finally:
        tracemalloc.stop()
    assert grown < 32 * 1024, f"{grown} bytes kept after 2000 rounds"


def test_misuse_is_refused() -> None:
    from drstream.daemon import _ccodec

    with pytest.raises(TypeError):
        _ccodec.decode_sections(bytearray(b"x"), 0, lambda *a: None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        _ccodec.decode_sections(b"x", 2, lambda *a: None)
    with pytest.raises(TypeError):
        _ccodec.configure(dict, KafkaBatch, ProduceBatch, SegmentFormatError)


# --------------------------------------------------------------------------- fallback

PROBE = """
import sys
{prelude}
from drstream.daemon import accel
from drstream.daemon.codec import KafkaBatch, KafkaRecord, make_manifest, Body
from drstream.daemon.keyring import KeyRing
from drstream.daemon.segment import ZERO_DIGEST, decode_segment, encode_segment
ring = KeyRing({{"k": bytes(32)}}, "k")
batches = [KafkaBatch("kafka:primary", "t", 0, [KafkaRecord(5, 9, 1, b"k", b"v", [("h", None)])])]
body = Body(make_manifest({{}}, batches), batches)
seg = encode_segment(body, log_id="l", seq=1, prev_digest=ZERO_DIGEST, keyring=ring)
assert decode_segment(seg, ring)[1] == body
print("compiled" if accel.COMPILED else "python", accel.__file__)
"""


def _probe(prelude: str = "", env: dict[str, str] | None = None,
           cwd: Path = ROOT) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE.format(prelude=prelude)], cwd=cwd,
                         env={**os.environ, **(env or {})}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_fallback_when_the_compiled_module_is_missing() -> None:
    out = _probe('sys.modules["drstream.daemon._ccodec"] = None  # as if it had not been built')
    assert out.startswith("python "), out


def test_fallback_forced_by_the_environment() -> None:
    assert _probe(env={accel.NO_ACCEL_ENV: "1"}).startswith("python "), "env var ignored"
    assert _probe(env={accel.NO_ACCEL_ENV: "0"}).startswith("compiled ")


def test_build_without_a_compiler_installs_the_python_path(tmp_path: Path) -> None:
    """What `pip install` runs (setup.py build) on a machine without a C compiler: a
    warning, a package without the extension, and a daemon that decodes segments."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("*.so", "__pycache__")
    for pkg in ("daemon", "connectors"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=ignore)
    lib = tmp_path / "lib"
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "build", "--build-lib", str(lib),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=src, env={**os.environ, "CC": "false", "LDSHARED": "false"},
        capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    assert "building extension" in build.stderr and "failed" in build.stderr, build.stderr
    assert (lib / "drstream" / "daemon" / "accel.py").exists()
    assert not list(lib.rglob("_ccodec*.so")), "the extension was built with CC=false?"
    # The test environment's editable install would find the worktree's build of
    # daemon._ccodec for a package imported from `lib`: the probe runs without it.
    no_editable = ('sys.meta_path[:] = [f for f in sys.meta_path '
                   'if not getattr(f, "__module__", "").startswith("__editable__")]')
    out = _probe(no_editable, env={"PYTHONPATH": str(lib)}, cwd=tmp_path)
    assert out == f"python {lib / 'drstream' / 'daemon' / 'accel.py'}\n", out
