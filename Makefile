# Tern: everyday entry points. `make setup` is idempotent and fast once done.
#   make setup   system packages (apt, chromium, JDK, Maven included), .venv, MicroPython build, umqtt and HiveMQ CE fetch
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
# pyvenv.cfg is a plain file written once per venv; bin/python is a symlink whose
# followed mtime is the system interpreter's, useless for make's date checks.
VENV_CFG := $(VENV)/pyvenv.cfg
STAMP  := .cache/venv.stamp
# Where the toolchain caches its MicroPython build (same rule as tern.toolchain.cache_dir).
TOOL_CACHE := $(or $(TERN_CACHE),.cache)

# Debian packages: the brokers, the MicroPython build (gcc/make, pkg-config + libffi for
# its ffi module; found by trying: the build fails to link without pkg-config) and venv.
MQTT_PKGS  := mosquitto mosquitto-clients
BUILD_PKGS := build-essential pkg-config libffi-dev
# The status page's browser test drives Debian's chromium with Playwright (never `playwright
# install`: that downloads a browser build, and there is no internet).
BROWSER_PKGS := chromium
# Apache Kafka (TERN_KAFKA=apache) and HiveMQ CE (tests/test_hivemq.py) run on a JDK; Maven
# fetches their jars from Maven Central (deploy/kafka/pom.xml, deploy/hivemq/pom.xml), and
# the JDK compiles HiveMQ's launcher. A release tarball is never downloaded.
JDK_PKG   := openjdk-17-jdk-headless
MAVEN_PKG := maven
# Which Kafka `make demo` and `make test` start: tansu (default) or apache.
KAFKA ?=
KAFKA_ENV := $(if $(KAFKA),TERN_KAFKA=$(KAFKA))

MAKEFLAGS += --no-print-directory
.DEFAULT_GOAL := help
.PHONY: help setup system-deps test test-quick demo bench check pi-check clean

help:
	@sed -n 's/^#   //p' $(firstword $(MAKEFILE_LIST))

setup: system-deps $(STAMP)
	@$(VPY) -m tern.toolchain setup

# Install only what is missing, so a second run neither calls apt nor needs root.
system-deps:
	@missing=""; \
	have_pkg() { dpkg-query -W -f='$${Status}' "$$1" 2>/dev/null | grep -q 'ok installed'; }; \
	{ command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; } || missing="$$missing mosquitto"; \
	command -v mosquitto_pub >/dev/null || missing="$$missing mosquitto-clients"; \
	[ -x /usr/bin/chromium ] || missing="$$missing $(BROWSER_PKGS)"; \
	{ [ -n "$$TERN_JAVA" ] && [ -n "$$TERN_HIVEMQ_LIBS" ]; } || command -v javac >/dev/null || missing="$$missing $(JDK_PKG)"; \
	{ [ -n "$$TERN_KAFKA_LIBS" ] && [ -n "$$TERN_HIVEMQ_LIBS" ]; } || command -v mvn >/dev/null || missing="$$missing $(MAVEN_PKG)"; \
	if [ -z "$$TERN_MICROPYTHON" ] && [ ! -x "$(TOOL_CACHE)/micropython/micropython" ]; then \
	  for p in $(BUILD_PKGS); do have_pkg $$p || missing="$$missing $$p"; done; \
	fi; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null; then sudo="sudo"; \
	else echo "setup: need root to install:$$missing (run as root: apt-get install -y$$missing)"; exit 1; fi; \
	echo "setup: apt-get install$$missing"; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null

$(VENV_CFG):
	@echo "setup: creating $(VENV)"
	@$(PYTHON) -m venv $(VENV)

# Reinstall only when pyproject.toml (or the venv itself) is newer than the stamp.
$(STAMP): pyproject.toml $(VENV_CFG)
	@echo "setup: pip install -e '.[dev]'"
	@$(VPY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@mkdir -p $(dir $@) && touch $@

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

check: $(STAMP)
	@$(VPY) -m tern.toolchain check

# Not part of `make test`: builds (once) a Debian bookworm arm64 root under /var/tmp/tern-pi
# ($$TERN_PI_DIR) with debootstrap and qemu-user-static, runs docs/gateway.md's steps in it,
# then the gateway against loopback brokers. Needs root; about 15-30 min the first time.
pi-check: $(STAMP)
	@$(VPY) -m tern.harness.pi_check $(PI_CHECK_ARGS)

clean:
	rm -rf $(VENV) .cache
