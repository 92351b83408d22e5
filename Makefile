# Two entry points, each creating the environment it needs (Python 3.11 + uv).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Debian packages the kernel-lab tests need (patches checked against the pinned
# source, the guest rootfs assembled, the idle QEMU guest booted; memcached for
# benchmarks/real_workloads.py; chromium for the test that opens the sweep's
# report.html headless; gcc and libc6-dev for the selftest, perl for checkpatch.pl);
# installed when missing and we are root.
SYSTEM_DEBS := busybox-static cpio linux-source-6.12 qemu-system-x86 memcached chromium \
	gcc libc6-dev perl
# ...and what building the guest kernels needs (make test-all): the 6.1 source for
# pre-6.12, and the kernel's build tools
KERNEL_DEBS := linux-source-6.1 bison flex libelf-dev bc libssl-dev
# prometheus: promtool checks the alerting rules and the metrics, and the watch's
# end-to-end test scrapes it with a server of its own (its recommends, node_exporter
# and friends, are not wanted)
SYSTEM_DEBS_ALONE := prometheus

.PHONY: demo test test-all lint bench clean system-deps kernel-deps

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv
	$(BIN)/python -m uv pip install -q --python $(BIN)/python -e '.[dev,model,sweep,watch]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ksmlab demo

system-deps: DEBS = $(SYSTEM_DEBS)
kernel-deps: DEBS = $(SYSTEM_DEBS) $(KERNEL_DEBS)
system-deps kernel-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    echo "installing $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  fi; \
	  alone=$$(for p in $(SYSTEM_DEBS_ALONE); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$alone" ]; then \
	    echo "installing $$alone"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends $$alone; \
	  fi; \
	fi

test: $(STAMP) system-deps
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/pytest -q

# everything, the opt-in suites too: patched kernels built and booted under qemu
# (KSMLAB_KERNEL_TESTS) and the minutes-long live suites (KSMLAB_LONG_TESTS)
test-all: $(STAMP) kernel-deps
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	KSMLAB_KERNEL_TESTS=1 KSMLAB_LONG_TESTS=1 $(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/model_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
