# netkit: the two set-up commands are `make demo` and `make test` (see README).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test venv tools-test tools-demo tools-bench bench bench-smoke clean guest-image soak

$(STAMP): pyproject.toml
	@if ! $(PYTHON) -m venv $(VENV) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing python3-venv" >&2; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip >/dev/null; \
	    rm -rf $(VENV); $(PYTHON) -m venv $(VENV); \
	  else echo "error: '$(PYTHON) -m venv' failed; install python3-venv" >&2; exit 1; fi; \
	fi
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

tools-test:
	@scripts/install-debian-tools.sh test
tools-demo:
	@scripts/install-debian-tools.sh demo
tools-bench:
	@scripts/install-debian-tools.sh bench

## demo: a namespace guest leases an address from netkit and pings the gateway
demo: venv tools-demo
	$(PY) -m netkit.demo

## test: every test (privileged ones need root)
test: venv tools-test
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

## guest-image: the QEMU test guest (Debian kernel + busybox initramfs) in build/guest (cached)
guest-image:
	tests/guest/build.sh

## bench: netkit against pasta, slirp4netns and a kernel veth (root; ~15 min; BENCH_ARGS="--only tcp" etc.)
BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) tools-bench
	$(PY) -m benchmarks $(BENCH_ARGS)

## bench-smoke: one short run of every stack and figure (about a minute)
bench-smoke: $(BENCH_STAMP) tools-bench
	$(PY) -m benchmarks --smoke $(BENCH_ARGS)

## soak: 10,000 connections, a full port scan, 1 GiB each way over a lossy link (3 seeds), a DNS flood, the memory attacks (root; ~16 min)
soak: venv tools-test
	$(PY) tests/soak/soak.py --json tests/soak/last-soak.json $(SOAK_ARGS)
