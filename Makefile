# Tern: everyday entry points. `make setup` is idempotent and fast once done.
#   make setup   system packages (apt, chromium, JDK, Maven included), .venv, MicroPython build, umqtt, Kafka and HiveMQ CE fetch
#   make test    run the whole test suite, in parallel (what CI runs)
#   make test-quick  codec, config, outbox and property tests only: under a minute
#   make demo    run the end-to-end demo (KAFKA=apache: on a 3-node Apache Kafka, default tansu)
#   make bench   run the benchmarks, write docs/benchmarks.md (exit 1 if a target is missed)
#   make check   show which tools are found, where, which version
#   make pi-check  docs/gateway.md's Pi install on an emulated Debian bookworm arm64 root (slow; not in test)
#   make clean   remove .venv and .cache

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
# Which Kafka `make demo` and `make test` start: tansu (default) or apache.
KAFKA ?=
KAFKA_ENV := $(if $(KAFKA),TERN_KAFKA=$(KAFKA))

MAKEFLAGS += --no-print-directory
.DEFAULT_GOAL := help
.PHONY: help setup venv test test-quick demo bench check pi-check clean

help:
	@sed -n 's/^#   //p' $(firstword $(MAKEFILE_LIST))

# tern/toolchain.py, with the system's python (the venv may not exist yet): installs the Debian
# packages that are missing (tern/system_packages.py: mosquitto, chromium, the build tools, the
# JDK and Maven), and runs side by side the venv's pip install, the MicroPython build and the
# Maven fetches of Kafka's and HiveMQ CE's jars; prints each step's seconds, then every tool.
# A second run finds everything cached: no apt, no root, about a second.
setup:
	@$(PYTHON) -m tern.toolchain setup

# The venv alone (for check and pi-check): created, or installed again after pyproject.toml changed.
venv:
	@$(PYTHON) -m tern.toolchain venv

# Parallel workers: most long tests wait on outages and timers, not on the CPU, so 4 workers
# keep 2 cores busy. Each worker has its own loopback ports (tests/conftest.py) and tmp dirs.
# loadgroup keeps the tests that share one heavy broker (xdist_group) on one worker.
TEST_WORKERS ?= 4
PYTEST := $(VPY) -m pytest -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup

test: setup
	@$(KAFKA_ENV) $(PYTEST) --durations=25 $(PYTEST_ARGS)

test-quick: setup
	@$(PYTEST) -m quick $(PYTEST_ARGS)

demo: setup
	@$(KAFKA_ENV) $(VPY) -m tern.harness.demo $(DEMO_ARGS)

bench: setup
	@if $(VPY) -c 'import importlib.util as u, sys; sys.exit(u.find_spec("tern.harness.bench") is None)'; then \
	  $(KAFKA_ENV) $(VPY) -m tern.harness.bench $(BENCH_ARGS); \
	else echo "bench: tern/harness/bench/ does not exist yet"; exit 1; fi

check: venv
	@$(VPY) -m tern.toolchain check

# Not part of `make test`: builds (once) a Debian bookworm arm64 root under /var/tmp/tern-pi
# ($$TERN_PI_DIR) with debootstrap and qemu-user-static, runs docs/gateway.md's steps in it,
# then the gateway against loopback brokers. Needs root; about 15-30 min the first time.
pi-check: venv
	@$(VPY) -m tern.harness.pi_check $(PI_CHECK_ARGS)

clean:
	rm -rf $(VENV) .cache
