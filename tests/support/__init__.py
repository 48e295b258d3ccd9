"""Helpers shared by the tests and the benchmarks: `drstream` commands as processes,
waiting for conditions. Service launchers (Kafka, S3, MLflow) live in tests/infra."""
