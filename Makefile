# Everything a fresh machine needs: `make demo` runs the job on its embedded default,
# `make test` passes the tests. Both create .venv from the pinned versions in constraints.txt.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Both CPU cores for XLA:CPU; a persistent compile cache so reruns skip compilation.
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0

.PHONY: venv demo test bench validate schema tokenizer demo-data clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: venv
	$(BIN)/tunix-job run --manifest manifests/local_tiny.json
	@echo "report: runs/local-tiny/delta_report.md"

test: venv
	$(BIN)/pytest -q --cov=job --cov-report=term --cov-fail-under=80

# Throughput, start-up, data and decoding figures -> BENCHMARKS.json / BENCHMARKS.md (~10-15 min on 2 cores).
bench: venv
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

validate: venv
	$(BIN)/tunix-job validate --manifest manifests/local_tiny.json

schema: venv
	$(BIN)/tunix-job schema > manifests/run_manifest.schema.json

tokenizer: venv
	$(BIN)/python scripts/build_tokenizer.py

demo-data: venv
	$(BIN)/python scripts/make_demo_data.py

clean:
	rm -rf runs .cache .pytest_cache .coverage htmlcov
