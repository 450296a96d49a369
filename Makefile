# The two commands: `make demo` (the main job) and `make test` (install + suite).
# Everything else is set up by these targets on a fresh machine.

PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST  := $(VPY) -m pytest

.PHONY: all install build test test-pure test-deps demo bench fuzz chaos clean

all: test

$(VPY):
	$(PY) -m venv $(VENV)

# Build requirements go into the venv first, so the editable install (which
# compiles core/_fastpath.pyx in place) and later `make build` use the same Cython.
$(STAMP): $(VPY) pyproject.toml setup.py
	$(VPY) -m pip install -q --upgrade pip setuptools wheel 'Cython>=3.0'
	$(VPY) -m pip install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Rebuild the extension whenever the Cython sources change.
core/_fastpath.stamp: $(STAMP) $(wildcard core/*.pyx core/*.pxd core/*.pxi)
	$(VPY) setup.py -q build_ext --inplace
	touch $@

# Byte-compile the project too: with PYTHONDONTWRITEBYTECODE set (as on some CI and
# sandbox images) every bus-node, manager and front end we start would otherwise compile
# its modules from source, ~40% of a node process's start-up CPU.  compileall skips
# what is up to date.
build: core/_fastpath.stamp
	$(VPY) -m compileall -q -j 0 bus core nodes manager frontends tools examples benchmarks > /dev/null

# Debian packages the tests need (a real sshd for the ssh bootstrap, ...); quick when present.
test-deps:
	bash scripts/test-deps.sh

test: build test-deps
	$(PYTEST) -q -m "not slow"
	BUS_NO_EXTENSIONS=1 $(PYTEST) -q -m "not slow" tests/core tests/bus/test_protocol.py

test-pure: build test-deps
	BUS_NO_EXTENSIONS=1 $(PYTEST) -q -m "not slow"

demo: build
	$(VPY) -m tools.demo

# Every suite and script runs (each prints its figures against a baseline
# from the same run); the target fails at the end if any of them missed one.
bench: build
	@status=0; \
	$(PYTEST) benchmarks -m "slow or not slow" --benchmark-enable -s \
		--benchmark-columns=min,median,mean,ops,rounds -p no:cacheprovider || status=1; \
	$(VPY) benchmarks/perf_relay.py || status=1; \
	$(VPY) benchmarks/perf_tree.py || status=1; \
	$(VPY) benchmarks/perf_deploy.py || status=1; \
	exit $$status

# The long coverage-guided fuzz (atheris) of every target, both twins; a crash becomes a
# regression input under tests/fuzz/regressions/ (the short run is part of `make test`).
FUZZ_SECONDS ?= 120
fuzz: build
	$(VPY) -m pip install -q -e '.[fuzz]'
	$(VPY) -m tools.fuzz --seconds $(FUZZ_SECONDS) --twin both

# The long chaos run under load (tools/chaos.py): kill -9 workers, nodes, a front end and the
# manager while TranSend serves; prints figures and the command to reproduce, writes chaos-report.json.
CHAOS_SECONDS ?= 90
CHAOS_SEED    ?= 1
chaos: build
	$(VPY) -m tools.chaos --seconds $(CHAOS_SECONDS) --seed $(CHAOS_SEED) --report chaos-report.json

clean:
	rm -rf $(VENV) build *.egg-info chaos-report.json core/_fastpath.c core/_fastpath*.so core/_fastpath.stamp core/_fastpath.html
