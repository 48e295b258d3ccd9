# drstream developer commands. `make test` works on a fresh machine: it creates .venv,
# installs the package with its test extra, and runs the whole suite, starting real Kafka
# clusters, an S3 API server and the GCS and Azure emulators itself (see tests/infra/).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test soak lint unit bench-codec bench-lag bench-restore services-down clean

$(VENV)/.installed: pyproject.toml setup.py daemon/_ccodec.c
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# systemd-analyze, promtool and the GCS and Azure emulators for the tests; a quick no-op
# once they are installed.
install: $(VENV)/.installed
	@bash .ci/install-tools.sh

demo: install
	$(PY) -m benchmarks.demo $(DEMO_ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The kill -9 crash tests that `make test` runs with fewer kills, at full length, and the
# minute-long store outage (~7 min).
soak: install
	$(PY) -m pytest --soak -k "kill9 or minute_without_the_store" \
		tests/integration/test_writer_crash.py tests/integration/test_ship_crash.py \
		tests/integration/test_shards.py tests/integration/test_store_outage.py $(PYTEST_ARGS)

unit: install
	$(PY) -m pytest tests/unit tests/contract -k "not s3 and not gcs and not azure" -m "not integration" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check daemon connectors tests benchmarks
	@# mypy finds modules by folder: show it daemon/ and connectors/ under their installed names
	mkdir -p $(VENV)/typecheck/drstream
	ln -sfn $(CURDIR)/daemon $(VENV)/typecheck/drstream/daemon
	ln -sfn $(CURDIR)/connectors $(VENV)/typecheck/drstream/connectors
	MYPYPATH=$(VENV)/typecheck $(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

bench-codec: install
	$(PY) -m benchmarks.codec

bench-lag: install
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	$(PY) -m benchmarks.lag

bench-restore: install
	$(PY) -m benchmarks.restore

services-down:
	$(PY) -m tests.infra stop-all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
