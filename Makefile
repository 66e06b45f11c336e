# Every target sets itself up (apt packages, .venv, build) through scripts/bootstrap.sh.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
STATE_DIR ?= var
CONFIG ?=

.PHONY: setup run test test-quick bench lint clean

setup:
	@bash scripts/bootstrap.sh

# The embedded test hypervisor, given a dense host (64 CPUs in 2 NUMA cells, 256 GiB) instead of
# test:///default's 16 CPUs and 6 GiB, so that the README's boot storm fits.
run: setup
	@mkdir -p $(STATE_DIR) && [ -f $(STATE_DIR)/demo.raw ] || truncate -s 64M $(STATE_DIR)/demo.raw
	@$(PY) -m fastcompute.hypervisor.libvirt.testhost $(STATE_DIR)/host.xml > /dev/null
	@echo "fastcompute agent on libvirt's embedded test hypervisor (a 64-CPU, 256 GiB test host), state in ./$(STATE_DIR)"
	@echo "  requests: tcp://127.0.0.1:7780   events: tcp://127.0.0.1:7781   metrics: http://127.0.0.1:7782/metrics"
	@echo "  try, in another shell:  .venv/bin/fastcompute ping; .venv/bin/fastcompute host;"
	@echo "    .venv/bin/fastcompute boot demo --count 5 --image $(STATE_DIR)/demo.raw --wait; .venv/bin/fastcompute list"
	@echo "  stop with Ctrl-C (SIGINT) or SIGTERM"
	$(VENV)/bin/fastcompute agent --state-dir $(STATE_DIR) --hypervisor test://$(abspath $(STATE_DIR))/host.xml \
		--metrics 127.0.0.1:7782 --file-root $(abspath $(STATE_DIR)) $(if $(CONFIG),--config $(CONFIG))

test: setup
	$(PY) -m pytest -q tests

test-quick: setup
	$(PY) -m pytest -q -m "not guest and not slow" tests

bench: setup
	$(PY) -m pytest -q -s bench --benchmark-columns=median,ops,rounds --benchmark-sort=name -p no:cacheprovider

lint: setup  # make test runs the same checks (tests/test_sourcecode.py)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf build $(VENV) $(STATE_DIR) .pytest_cache .mypy_cache .ruff_cache .benchmarks
