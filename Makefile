# Thin targets: the work is in scripts/ (each one `set -euo pipefail`).
.PHONY: setup models test lint replica clean

setup:  ## venv with dependencies, OS packages when root, demo models
	scripts/bootstrap

models:  ## train the demo models if absent
	scripts/bootstrap --no-os

test:  ## the whole suite (what CI runs)
	scripts/test

lint:
	.venv/bin/ruff check service tests scripts && .venv/bin/ruff format --check service tests scripts && .venv/bin/mypy

replica:  ## one replica in the foreground on SERVICE_BIND (default 127.0.0.1:8000)
	.venv/bin/gunicorn -c service/gunicorn.conf.py service.wsgi:app

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
