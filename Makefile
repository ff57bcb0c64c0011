# Thin targets: the work is in scripts/ (each one `set -euo pipefail`).
REPLICAS ?= 4
PORT ?= 8080

.PHONY: up down status scale bench bench-targets audit setup models test k8s-check lint replica clean

up:  ## install what is missing, start Redis + REPLICAS replicas + nginx on PORT
	scripts/cluster up --replicas $(REPLICAS) --port $(PORT)

down:  ## stop everything `up` started
	scripts/cluster down

status:  ## each component: pid, port, health
	scripts/cluster status

scale:  ## change the replica count of the running cluster: make scale REPLICAS=n
	scripts/cluster scale $(REPLICAS)

bench:  ## the benchmark sweep -> reports/<timestamp>/report.md and report.html (QUICK=1: a smoke run; URL=...: a running deployment)
	scripts/bench $(if $(QUICK),--quick,) $(if $(URL),--url $(URL),) $(if $(INTERNAL_URL),--internal-url $(INTERNAL_URL),)

bench-targets:  ## only the performance targets' points, one line per target (a benchmark, not a test)
	scripts/bench --targets

test-overload:  ## the overload test (open loop at 3x capacity), opt-in: too noisy for a shared CI machine
	OVERLOAD_E2E=1 .venv/bin/python -m pytest -m overload tests/integration/test_overload.py

bench-overload:  ## open loop below and past capacity, admission control on and off -> reports/overload-<time>/
	.venv/bin/python -m loadtest.overload

audit:  ## known vulnerabilities in the installed dependencies (needs PyPI's JSON API or OSV)
	.venv/bin/pip-audit --progress-spinner off

setup:  ## venv with dependencies, OS packages when root, demo models
	scripts/bootstrap

models:  ## train the demo models if absent
	scripts/bootstrap --no-os

test:  ## the whole suite (what CI runs)
	scripts/test

k8s-check:  ## the Kubernetes manifests: schemas, nginx -t, policies, first-apply rules, checkov (no cluster)
	scripts/bootstrap --tools
	.venv/bin/python -m pytest -q tests/unit/test_kubernetes.py tests/unit/test_kubernetes_first_apply.py

lint:
	.venv/bin/ruff check service balancer localcluster loadtest tests scripts
	.venv/bin/ruff format --check service balancer localcluster loadtest tests scripts
	.venv/bin/mypy

replica:  ## one replica in the foreground on SERVICE_BIND (default 127.0.0.1:8000)
	.venv/bin/gunicorn -c service/gunicorn.conf.py service.wsgi:app

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
