"""Prometheus metrics of the MLflow connector (in the daemon's registry)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from drstream.daemon.metrics import REGISTRY, SOURCE_UP

__all__ = ["ARTIFACT_BYTES", "EVENTS", "RECONCILES", "RECONCILE_SECONDS", "SOURCE_UP",
           "WEBHOOKS_ACCEPTED", "WEBHOOKS_REJECTED"]
WEBHOOKS_ACCEPTED = Counter("drstream_mlflow_webhooks_accepted", "Valid signed MLflow "
                            "webhooks received", ["stream"], registry=REGISTRY)
WEBHOOKS_REJECTED = Counter("drstream_mlflow_webhooks_rejected", "MLflow webhooks refused "
                            "with 401, by reason (unsigned, bad_signature, stale, replayed, "
                            "malformed)", ["stream", "reason"], registry=REGISTRY)
RECONCILES = Counter("drstream_mlflow_reconciles", "Registry snapshots diffed against the "
                     "shipped state, by trigger (interval, webhook, start)",
                     ["stream", "trigger"], registry=REGISTRY)
EVENTS = Counter("drstream_mlflow_events", "Registry change events shipped", ["stream"],
                 registry=REGISTRY)
ARTIFACT_BYTES = Counter("drstream_mlflow_artifact_bytes", "Artifact bytes read from the "
                         "registry and stored as blobs", ["stream"], registry=REGISTRY)
RECONCILE_SECONDS = Histogram("drstream_mlflow_reconcile_seconds", "Time to snapshot and diff "
                              "the registry (artifact capture included)", ["stream"],
                              buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
                              registry=REGISTRY)
