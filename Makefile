# orthanc-ai: the two commands are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
# The project venv; another one (e.g. VENV=.venv-trixie) keeps a second release's venv apart.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL := triton_models/ct_lung/1/model.onnx
# Orthanc's plugin script (orthanc_plugin/orthanc_entry.py) and the workers use this venv.
export ORTHANC_AI_VENV := $(abspath $(VENV))

.PHONY: help install model up down demo test test-unit test-trixie lint bench clean

help:
	@echo "make demo   install, start Orthanc + Triton, process the demo chest CT, show the results"
	@echo "make test   install, then run the whole test suite (starts real Orthanc and Triton)"
	@echo "make up / make down   start / stop the local stack (Orthanc :8042, Triton :8000/:8001)"
	@echo "make test-trixie   the Debian 13 check in a debootstrap root under var/ (root only)"
	@echo "make lint   ruff + mypy;  make bench   benchmarks;  make model   rebuild the ct_lung ONNX"

install:
	@VENV=$(VENV) bash scripts/install.sh
	@bash scripts/install_viewer.sh
	@bash scripts/install_fhir_peer.sh

# The ONNX is committed; it is rebuilt only when absent (or with `make model FORCE=1`).
$(MODEL):
	@bash scripts/build_models.sh

model:
	@if [ -n "$(FORCE)" ]; then rm -f $(MODEL); fi
	@$(MAKE) --no-print-directory $(MODEL)

up: install $(MODEL)
	@$(PY) -m devstack.stack up

down:
	@$(PY) -m devstack.stack down

demo: up
	@$(PY) scripts/demo.py

test: install $(MODEL)
	@$(PY) -m pytest -q -rfEs tests

test-unit: install
	@$(PY) -m pytest -q tests/unit

# Debian 13: install, `make demo` and the chosen integration tests in a trixie root (scripts/trixie.sh).
test-trixie:
	@bash scripts/trixie.sh

lint: install
	@$(VENV)/bin/ruff check orthanc_plugin devstack tests triton_backends triton_models scripts bench
	@$(VENV)/bin/ruff format --check orthanc_plugin devstack tests triton_backends triton_models scripts bench
	@$(VENV)/bin/mypy

bench: install $(MODEL)
	@$(PY) bench/triton_transport.py
	@$(PY) bench/model_latency.py --runs 7
	@$(PY) bench/pipeline_stages.py --runs 7
	@$(PY) bench/pipeline_stages.py --slices 320 --runs 5
	@$(PY) bench/time_to_result.py --runs 5
	@$(PY) bench/fetch_transport.py --slices 320 --runs 5
	@$(PY) bench/throughput.py --studies 50 --workers 1 2 4
	@bash bench/setup_monai_deploy.sh
	@$(PY) bench/monai_deploy_compare.py --runs 7
	@$(PY) bench/compare.py
	@$(PY) bench/report.py

# Not all of var/: var/trixie-root is the Debian 13 root of `make test-trixie` (kept on purpose).
clean: down
	rm -rf var/log var/orthanc-storage var/triton-backends-py* var/ehr-data.jsonl var/trixie test-artifacts
