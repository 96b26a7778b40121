# Everything a fresh machine needs: `make demo` runs the job on its embedded default,
# `make test` passes the tests. Both create .venv from the pinned versions in constraints.txt.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Both CPU cores for XLA:CPU; a persistent compile cache so reruns skip compilation.
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0

.PHONY: venv demo test bench validate schema tokenizer demo-data clean image image-tpu image-base test-container lint-deploy

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
	$(BIN)/pytest -q --durations=15 --cov=job --cov-report=term --cov-fail-under=80

# Throughput, start-up, data and decoding figures -> BENCHMARKS.json / BENCHMARKS.md (~20 min on 2 cores).
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

# -- containers and Kubernetes (README: "Containers and Kubernetes") -----------------------------
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
IMAGE_CPU ?= tunix-rt-job:$(VERSION)-cpu
IMAGE_TPU ?= tunix-rt-job:$(VERSION)-tpu
# CI has no registry: the container test builds FROM a Debian 12 image made with debootstrap.
LOCAL_BASE ?= localhost/tunix-rt-base:bookworm
TEST_IMAGE ?= localhost/tunix-rt-job:test-cpu
CI_CONTAINERS_CONF := $(CURDIR)/.ci/containers.conf

image:
	scripts/build_image.sh -t $(IMAGE_CPU) cpu

image-tpu:
	scripts/build_image.sh -t $(IMAGE_TPU) tpu

image-base:
	CONTAINERS_CONF=$${CONTAINERS_CONF:-$(CI_CONTAINERS_CONF)} scripts/build_base_image.sh -t $(LOCAL_BASE)

# Root, buildah, podman, runc and debootstrap (.ci/run installs them). The base image is made once per
# machine; the job image is rebuilt (cached layers) and the tiny job run in it.
test-container: venv
	set -e; export CONTAINERS_CONF=$${CONTAINERS_CONF:-$(CI_CONTAINERS_CONF)}; \
	podman image exists $(LOCAL_BASE) || scripts/build_base_image.sh -t $(LOCAL_BASE); \
	scripts/build_image.sh -b $(LOCAL_BASE) -t $(TEST_IMAGE) cpu; \
	TUNIX_JOB_TEST_IMAGE=$(TEST_IMAGE) $(BIN)/pytest -q -p no:cacheprovider tests/container

lint-deploy: venv
	$(BIN)/hadolint $$(find docker -name 'Dockerfile*' -o -name '*.Dockerfile')
	$(BIN)/python scripts/lint_k8s.py k8s/*.yaml

clean:
	rm -rf runs .cache .pytest_cache .coverage htmlcov
