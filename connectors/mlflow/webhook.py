"""Receiving MLflow webhooks: a small aiohttp server that checks signatures.

MLflow (3.3+) signs each delivery with the webhook's secret:

    X-MLflow-Delivery-Id: <uuid>
    X-MLflow-Timestamp:   <unix seconds>
    X-MLflow-Signature:   v1,<base64(HMAC-SHA256(secret, "<delivery id>.<timestamp>.<raw body>"))>

A delivery is accepted only with a valid signature, a timestamp within `tolerance_s` of
now (either side) and a delivery id not seen before (replays within the tolerance window
are refused; older ones are refused as stale). Anything else gets 401 and is counted by
reason. Webhooks are only a latency hint: an accepted one wakes the source, which then
reconciles the whole registry; the payload is never trusted for content.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

from aiohttp import web

from drstream.connectors.mlflow.metrics import WEBHOOKS_ACCEPTED, WEBHOOKS_REJECTED
from drstream.daemon.logging import get_logger

log = get_logger("drstream.mlflow.webhook")

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
WEBHOOK_PATH = "/webhook"
MAX_BODY_BYTES = 1 << 20
MAX_REMEMBERED_DELIVERIES = 100_000
MAX_DELIVERY_ID_LEN = 200


def _mac(secret: str, delivery_id: str, timestamp: str, body: bytes) -> bytes:
    return hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body,
                    hashlib.sha256).digest()


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The `X-MLflow-Signature` value MLflow sends for this delivery."""
    mac = _mac(secret, delivery_id, timestamp, body)
    return f"{SIGNATURE_VERSION},{base64.b64encode(mac).decode()}"


class ReplayGuard:
    """Delivery ids seen within the tolerance window (older ones are refused as stale)."""

    def __init__(self, tolerance_s: float, max_entries: int = MAX_REMEMBERED_DELIVERIES) -> None:
        self.tolerance_s = tolerance_s
        self.max_entries = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()

    def seen(self, delivery_id: str, now: float) -> bool:
        horizon = now - 2 * self.tolerance_s
        while self._seen and (next(iter(self._seen.values())) < horizon
                              or len(self._seen) > self.max_entries):
            self._seen.popitem(last=False)
        return delivery_id in self._seen

    def remember(self, delivery_id: str, now: float) -> None:
        self._seen[delivery_id] = now


def check_delivery(headers: Mapping[str, str], body: bytes, secret: str,
                   tolerance_s: float, guard: ReplayGuard,
                   now: float | None = None) -> str | None:
    """None if the delivery is authentic and fresh (and remembers it); else the reason."""
    signature = headers.get(SIGNATURE_HEADER)
    timestamp = headers.get(TIMESTAMP_HEADER)
    delivery_id = headers.get(DELIVERY_ID_HEADER)
    if not signature:
        return "unsigned"
    if not timestamp or not delivery_id or len(delivery_id) > MAX_DELIVERY_ID_LEN:
        return "malformed"
    version, _, b64 = signature.partition(",")
    if version != SIGNATURE_VERSION or not b64:
        return "malformed"
    try:
        given = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        return "malformed"
    if not hmac.compare_digest(given, _mac(secret, delivery_id, timestamp, body)):
        return "bad_signature"
    try:
        ts = int(timestamp)
    except ValueError:
        return "malformed"
    now = time.time() if now is None else now
    if abs(now - ts) > tolerance_s:
        return "stale"
    if guard.seen(delivery_id, now):
        return "replayed"
    guard.remember(delivery_id, now)
    return None


class WebhookReceiver:
    """POST /webhook: verify, answer 200 and call `on_valid()`, or 401."""

    def __init__(self, listen: str, secret: str, tolerance_s: float, stream: str,
                 on_valid: Callable[[], None]) -> None:
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]") or "127.0.0.1"
        self.port = int(port)
        self.secret = secret
        self.tolerance_s = tolerance_s
        self.stream = stream
        self.on_valid = on_valid
        self.guard = ReplayGuard(tolerance_s)
        self.accepted = 0
        self.rejected = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{WEBHOOK_PATH}"

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post(WEBHOOK_PATH, self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        if self.port == 0 and server is not None:
            sockets = getattr(server, "sockets", None) or []
            self.port = int(sockets[0].getsockname()[1])
        log.info("mlflow_webhook_listening", stream=self.stream, url=self.url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._reject("malformed")
        reason = check_delivery(request.headers, body, self.secret, self.tolerance_s,
                                self.guard)
        if reason is not None:
            return self._reject(reason)
        self.accepted += 1
        WEBHOOKS_ACCEPTED.labels(self.stream).inc()
        log.debug("mlflow_webhook_accepted", stream=self.stream)
        self.on_valid()
        return web.json_response({"ok": True})

    def _reject(self, reason: str) -> web.Response:
        self.rejected += 1
        WEBHOOKS_REJECTED.labels(self.stream, reason).inc()
        log.warning("mlflow_webhook_rejected", stream=self.stream, reason=reason)
        return web.json_response({"error": reason}, status=401)
