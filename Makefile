# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

install:
	@bash scripts/bootstrap.sh

demo: install
	$(PY) scripts/demo.py

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench:
	@bash scripts/bootstrap.sh --bench
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .demo
