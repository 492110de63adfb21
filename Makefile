# Two entry points: `make demo` runs the whole system once, `make test` runs the checks.
# Both create the virtual environment and fetch Kafka on first use.
ENV := scripts/env.sh

.PHONY: demo test test-slow lint bench

demo:
	$(ENV) fanomad-stream demo --config configs/demo.yaml

test: lint
	$(ENV) python -m pytest -m "not slow" tests

test-slow:
	$(ENV) python -m pytest -m slow tests

lint:
	$(ENV) ruff check fanomad_stream tests scripts
	$(ENV) ruff format --check fanomad_stream tests scripts
	$(ENV) mypy

bench:
	$(ENV) fanomad-stream bench --config configs/demo.yaml
