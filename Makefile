# Every target a user needs; `make help` lists them. Tests run from a git-ignored venv with exact pins.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): requirements-dev.txt app/requirements.txt app/requirements-otel.txt pyproject.toml instrumentation/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@# --no-compile: bytecode is written on first import instead, which halves the install (90 s -> 48 s).
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e ./instrumentation -e .
	touch $@

venv: $(STAMP) ## create .venv with the pinned dependencies

# The Go builds are one table (tooling/builds/recipes.py); `python -m tooling.builds NAME...` prints the
# binaries' paths, building what is missing into .cache/ (minutes the first time, nothing after).
collector: $(STAMP) ## build (once, cached in .cache/) the OTel Collector from otel-collector/builder-config.yaml
	$(PY) -m tooling.builds collector

prometheus: $(STAMP) ## build Prometheus and promtool (compose version) from the Go module, cached in .cache/
	$(PY) -m tooling.builds prometheus

alertmanager: $(STAMP) ## build Alertmanager and amtool (compose version) from the Go module, cached in .cache/
	$(PY) -m tooling.builds alertmanager

sloth: $(STAMP) ## build (once, cached in .cache/) Sloth, the SLO rule generator (prometheus/slo/ -> rules/dice-slo.yaml)
	$(PY) -m tooling.builds sloth

edge: $(STAMP) ## build (once, cached in .cache/) Caddy, the edge proxy, at CADDY_VERSION from .env
	$(PY) -m tooling.builds caddy

exporters: $(STAMP) ## build (once, cached in .cache/) node_exporter and cAdvisor (cadvisor/native) at their .env versions
	$(PY) -m tooling.builds node-exporter cadvisor

k8s-tools: $(STAMP) ## build (once, cached in .cache/) kube-apiserver, kubectl, etcd, kubeconform and the OTel Operator for the k8s tests
	$(PY) -m tooling.builds kubernetes etcd kubeconform operator kubernetes-schemas crd-schemas

test-tools: $(STAMP) ## build the test helpers: Docker Compose's loader (tests/compose/compose_config) and vegeta
	$(PY) -m tooling.builds compose-config vegeta

k8s: $(STAMP) ## regenerate k8s/'s copies of the compose configs (a test fails when they drift)
	$(PY) -m tooling.k8s.render

test: $(STAMP) ## the unit and integration tiers (the docker tiers are make e2e and make e2e-k8s)
	@# The Go builds at once: with warm Go caches they are mostly linking, one core each.
	$(MAKE) --no-print-directory -j5 collector prometheus alertmanager sloth edge exporters k8s-tools test-tools
	@# Three workers on 2 cores, a test file each at a time, in tests/conftest.py's LONGEST_FIRST order:
	@# most integration time is waiting on export, scrape and alert intervals, and the three alert files
	@# alone take 25 of 49 test-minutes. Two workers took 24 minutes; three about 18. At most two alert
	@# files run at once (conftest.py, ALERT_PAIR: one worker runs two of them in turn): their latency
	@# SLOs fail with all three. Tests that measure the machine check against what the kernel and the
	@# collector say happened, not against spare CPU. The docker tiers need a Docker engine and, for kind, release downloads: they are their own
	@# targets, never part of this one.
	@echo "make test: unit and integration tiers; the docker tiers are 'make e2e' (compose) and 'make e2e-k8s' (kind)"
	$(PY) -m pytest -n 3 --dist loadfile --no-loadscope-reorder -m "not e2e"

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check .

native-up: $(STAMP) collector prometheus alertmanager exporters ## run collector, Prometheus, Alertmanager, the exporters and the app here, no Docker (Tempo/Pyroscope are sinks)
	$(PY) -m tooling.native up

native-down: ## stop what native-up started
	$(PY) -m tooling.native down

SCENARIO ?= steady
DURATION ?= 60
compare: $(STAMP) collector prometheus alertmanager ## run a load scenario and compare every source with what locust sent (SCENARIO=, DURATION=)
	$(PY) -m tooling.reports.compare --scenario $(SCENARIO) --duration $(DURATION) $(COMPARE_ARGS)

bench: $(STAMP) collector prometheus ## what observing costs: the profiles side by side, about 9 minutes (needs wrk; BENCH_ARGS=--in-process: the levers)
	@command -v wrk >/dev/null || { echo "make bench needs wrk, the closed-loop load generator: sudo apt-get install wrk"; exit 1; }
	$(PY) -m tooling.reports.bench $(BENCH_ARGS)

up: ## start the whole stack in Docker and wait until it is healthy
	docker compose up -d --wait

down: ## stop the Docker stack and delete its volumes
	docker compose down -v

e2e: $(STAMP) ## only the docker tier: the compose stack (needs a Docker engine)
	$(PY) -m pytest -m e2e tests/e2e/test_stack.py

e2e-k8s: $(STAMP) k8s-tools ## the docker tier on Kubernetes: k8s/ on a kind cluster with the Operator (needs Docker)
	$(PY) -m pytest -m e2e tests/e2e/test_kind.py

clean: ## remove the venv and cached builds
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache *.egg-info

.PHONY: help venv collector prometheus alertmanager sloth edge exporters k8s-tools test-tools k8s test lint native-up native-down compare bench up down e2e e2e-k8s clean
