# The two commands: `make run` (set up and run the embedded stack) and `make test` (set up and run the tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# Test processes: most of a stack test's time is waiting (for a kill to be noticed, an outage to end), so
# two processes finish the suite in a little over half the time on two cores. Each process starts its own
# broker and PostgreSQL; `--dist loadfile` keeps a module's tests (and its shared stack) in one process.
TEST_PROCESSES ?= 2

.PHONY: run test setup postgres prometheus chromium docker lint typecheck bench clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

## setup: the virtualenv, the project and its dependencies, and the Kafka broker's jars (cached)
setup: $(INSTALLED)
	$(BIN)/conveyor kafka fetch

## run: the whole embedded stack in the foreground (Ctrl-C stops it)
run: setup
	$(BIN)/conveyor run

## postgres: PostgreSQL from Debian's packages, if it is not installed (the tests start their own server)
postgres:
	bash scripts/ensure-postgres.sh

## prometheus: Prometheus and promtool from Debian's packages, if missing (the tests run their own server)
prometheus:
	bash scripts/ensure-prometheus.sh

## chromium: Debian's Chromium, if missing (the dashboard's tests drive it with Playwright; no download)
chromium:
	bash scripts/ensure-chromium.sh

## docker: a Docker engine with compose v2 (Debian's docker.io and a host-networking dockerd if none
## answers) and the local images the compose tests run on (tests/test_compose.py)
docker: setup
	CONVEYOR_PYTHON=$(BIN)/python bash scripts/ensure-docker.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

## test: lint, type-check, then every test against a real Kafka broker, SQLite and PostgreSQL (and a
## real Prometheus for the metrics, Debian's Chromium for the dashboard, and Docker for docker-compose.yml)
test: setup postgres prometheus chromium docker lint typecheck
	$(BIN)/pytest -n $(TEST_PROCESSES) --dist loadfile

## bench: throughput of noop jobs on SQLite, then on PostgreSQL (wrk is installed if missing); then 2000
## progress subscribers (latency, memory); then priorities under saturation; then the autoscaler's reaction
bench: setup postgres
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/throughput.py --database postgresql
	$(BIN)/python bench/progress_fanout.py
	$(BIN)/python bench/priority.py
	$(BIN)/python bench/autoscale.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
