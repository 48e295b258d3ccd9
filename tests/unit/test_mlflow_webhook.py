"""The MLflow webhook receiver: real HTTP requests signed the way MLflow signs them."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature

from drstream.connectors.mlflow.metrics import WEBHOOKS_REJECTED
from drstream.connectors.mlflow.webhook import (
    DELIVERY_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    ReplayGuard,
    WebhookReceiver,
    check_delivery,
    sign,
)

SECRET = "whsec-test-0123456789"
STREAM = "mlflow:unit"
TOLERANCE_S = 300.0


def body_bytes() -> bytes:
    return json.dumps({"entity": "model_version", "action": "created",
                       "timestamp": "2026-01-01T00:00:00+00:00",
                       "data": {"name": "m", "version": "1"}}).encode()


def signed(body: bytes, *, secret: str = SECRET, ts: int | None = None,
           delivery_id: str | None = None) -> dict[str, str]:
    delivery_id = delivery_id or str(uuid.uuid4())
    timestamp = str(int(time.time()) if ts is None else ts)
    return {"Content-Type": "application/json", DELIVERY_ID_HEADER: delivery_id,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(secret, delivery_id, timestamp, body)}


def rejected(reason: str) -> float:
    return WEBHOOKS_REJECTED.labels(STREAM, reason)._value.get()


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[WebhookReceiver, list[float]]]:
    woken: list[float] = []
    r = WebhookReceiver("127.0.0.1:0", SECRET, TOLERANCE_S, STREAM,
                        lambda: woken.append(time.monotonic()))
    await r.start()
    try:
        yield r, woken
    finally:
        await r.stop()


async def post(r: WebhookReceiver, body: bytes, headers: dict[str, str]) -> int:
    async with aiohttp.ClientSession() as s, s.post(r.url, data=body, headers=headers) as resp:
        await resp.read()
        return resp.status


def test_our_signature_equals_mlflows() -> None:
    body = body_bytes()
    assert sign(SECRET, "d-1", "1700000000", body) == _generate_hmac_signature(
        SECRET, "d-1", "1700000000", body.decode())


async def test_valid_delivery_wakes_the_source(receiver) -> None:  # type: ignore[no-untyped-def]
    r, woken = receiver
    body = body_bytes()
    assert await post(r, body, signed(body)) == 200
    assert len(woken) == 1 and r.accepted == 1 and r.rejected == 0


@pytest.mark.parametrize("case", ["unsigned", "forged", "tampered", "stale", "future",
                                  "replayed", "garbage_signature", "wrong_version"])
async def test_bad_deliveries_are_refused_and_counted(receiver, case: str) -> None:  # type: ignore[no-untyped-def]
    r, woken = receiver
    body = body_bytes()
    headers = signed(body)
    reason = {"unsigned": "unsigned", "forged": "bad_signature", "tampered": "bad_signature",
              "stale": "stale", "future": "stale", "replayed": "replayed",
              "garbage_signature": "malformed", "wrong_version": "malformed"}[case]
    if case == "unsigned":
        del headers[SIGNATURE_HEADER]
    elif case == "forged":
        headers = signed(body, secret="not-the-secret")
    elif case == "tampered":
        body = body.replace(b'"m"', b'"evil"')
    elif case == "stale":
        headers = signed(body, ts=int(time.time() - TOLERANCE_S - 5))
    elif case == "future":
        headers = signed(body, ts=int(time.time() + TOLERANCE_S + 5))
    elif case == "replayed":
        assert await post(r, body, headers) == 200
        woken.clear()
    elif case == "garbage_signature":
        headers[SIGNATURE_HEADER] = "v1,***not base64***"
    elif case == "wrong_version":
        headers[SIGNATURE_HEADER] = "v0," + headers[SIGNATURE_HEADER].split(",", 1)[1]
    before = rejected(reason)
    assert await post(r, body, headers) == 401
    assert woken == []
    assert rejected(reason) == before + 1


async def test_get_and_other_paths_do_not_wake(receiver) -> None:  # type: ignore[no-untyped-def]
    r, woken = receiver
    async with aiohttp.ClientSession() as s:
        async with s.get(r.url) as resp:
            assert resp.status == 405
        async with s.post(r.url.replace("/webhook", "/other"), data=b"{}") as resp:
            assert resp.status == 404
    assert woken == []


def test_replay_guard_forgets_after_the_window() -> None:
    guard = ReplayGuard(tolerance_s=10)
    body = body_bytes()
    now = 1_700_000_000.0
    headers = signed(body, ts=int(now), delivery_id="d-1")
    assert check_delivery(headers, body, SECRET, 10, guard, now=now) is None
    assert check_delivery(headers, body, SECRET, 10, guard, now=now + 1) == "replayed"
    # much later the id is forgotten, but the timestamp makes the delivery stale anyway
    assert check_delivery(headers, body, SECRET, 10, guard, now=now + 100) == "stale"
    assert guard.seen("d-1", now + 100) is False
