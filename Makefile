# kuberun developer tasks. `make test` is the one command that must pass.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: system-deps venv build lint test fuzz fuzz-long bench demo clean

system-deps:
	./scripts/system-deps.sh

venv: system-deps $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip "setuptools>=77" "Cython>=3.1,<3.4"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Compile the Cython relay next to its sources (editable installs import it from there).
build: venv
	$(PY) setup.py -q build_ext --inplace

lint: build
	$(VENV)/bin/ruff check kuberun tests benchmarks fuzz examples
	$(VENV)/bin/mypy

# Everything that must pass: lint, types, the whole test suite with the Cython relay
# required (a missing build fails instead of silently testing only the Python twin),
# then a short differential fuzzing run.
test: lint
	KUBERUN_REQUIRE_EXTENSIONS=1 $(PY) -m pytest -q tests
	$(MAKE) fuzz

fuzz: build
	KUBERUN_REQUIRE_EXTENSIONS=1 $(PY) fuzz/fuzz_relay.py -max_total_time=30 -rss_limit_mb=2048
	KUBERUN_REQUIRE_EXTENSIONS=1 $(PY) fuzz/fuzz_status.py -max_total_time=15 -rss_limit_mb=2048
	KUBERUN_REQUIRE_EXTENSIONS=1 $(PY) fuzz/fuzz_upgrade.py -max_total_time=15 -rss_limit_mb=2048

fuzz-long: build
	KUBERUN_REQUIRE_EXTENSIONS=1 $(PY) fuzz/fuzz_relay.py -max_total_time=600 -rss_limit_mb=2048
	KUBERUN_REQUIRE_EXTENSIONS=1 $(PY) fuzz/fuzz_status.py -max_total_time=600 -rss_limit_mb=2048
	KUBERUN_REQUIRE_EXTENSIONS=1 $(PY) fuzz/fuzz_upgrade.py -max_total_time=600 -rss_limit_mb=2048

# The demo: a local cluster and a gateway on 127.0.0.1:2222; prints the ssh command.
demo: build
	$(VENV)/bin/kuberun demo

bench: build
	KUBERUN_REQUIRE_EXTENSIONS=1 $(PY) -m pytest benchmarks --benchmark-only --benchmark-group-by=param:size --benchmark-columns=min,median,mean,ops

# The sdist and, built from it, a manylinux wheel repaired by auditwheel, into dist/.
.PHONY: wheel test-wheel
wheel: system-deps
	PYTHON=$(PYTHON) ./scripts/test-wheel.sh --no-test

# `make wheel`, then the repaired wheel installed in a fresh venv and the tests run against it
# (tests/unit by default; WHEEL_TESTS='tests/integration -x' for others).
test-wheel: system-deps
	PYTHON=$(PYTHON) ./scripts/test-wheel.sh $(or $(WHEEL_TESTS),tests/unit)

clean:
	rm -rf build dist *.egg-info kuberun/_relay.c kuberun/_relay*.so kuberun/_relay.html

# End-to-end benchmarks (several minutes; not part of `make test`): the gateway against
# devcluster versus a direct asyncssh server, each in its own process; throughput with
# OpenSSH, keystroke latency, 100-1,000 concurrent sessions. Tables go to stdout, samples
# to .benchmarks/e2e/. Pass options with BENCH_E2E_ARGS (see `python -m benchmarks.e2e -h`).
.PHONY: bench-e2e
bench-e2e: build
	KUBERUN_REQUIRE_EXTENSIONS=1 $(PY) -m benchmarks.e2e $(BENCH_E2E_ARGS)

# ssh -L through the gateway against ssh -L through a direct asyncssh server (results in
# benchmarks/RESULTS.md): throughput both ways, CPU per GiB, 1-byte echo latency.
.PHONY: bench-forward
bench-forward: build
	KUBERUN_REQUIRE_EXTENSIONS=1 $(PY) -m benchmarks.e2e.forward $(BENCH_FORWARD_ARGS)

# The long chaos run (not part of `make test`, which runs a short one): 1,000 random
# connection lifecycles under injected API, exec and node faults, with clients killed
# mid-start and mid-transfer, against gateway processes SIGTERMed mid-traffic; exits
# non-zero on any leaked Pod, silent session end, hang or unhandled exception.
# Options via CHAOS_ARGS (see `python -m tests.integration.chaos --help`).
.PHONY: chaos
chaos: build
	KUBERUN_REQUIRE_EXTENSIONS=1 $(PY) -m tests.integration.chaos $(or $(CHAOS_ARGS),--lifecycles 1000 --epochs 8 --seed 1)

# The suites against a real single-node Kubernetes built from the official sources
# (scripts/realcluster; a cold first run builds it): `up` (reusing a cluster already
# running from REALCLUSTER_DIR), the integration tests with KUBERUN_TEST_CLUSTER=real,
# then `down`, always (REALCLUSTER_KEEP=1 keeps it running). Tests marked
# devcluster_only (fault injection) are deselected; pytest's summary counts them.
REALCLUSTER_DIR ?= $(CURDIR)/.realcluster
REAL_TESTS ?= tests/integration/test_gateway_core.py tests/integration/test_session_parity.py \
	tests/integration/test_cli.py tests/integration/test_exit_after_output.py \
	tests/integration/test_backpressure.py tests/integration/test_security.py \
	tests/integration/test_hostile_clients.py tests/integration/test_real_cluster.py \
	tests/integration/test_fidelity.py tests/integration/test_deploy.py \
	tests/integration/test_workspaces.py tests/integration/test_workspaces_replicas.py
.PHONY: test-real chaos-real
test-real: build
	./scripts/with-realcluster $(REALCLUSTER_DIR) env KUBERUN_REQUIRE_EXTENSIONS=1 \
		$(PY) -m pytest -q -m 'not devcluster_only' $(REAL_TESTS) $(REAL_TEST_ARGS)

# The chaos run against the real cluster, with the faults a real cluster can take
# (tests/integration/chaos_real.py): kube-apiserver SIGKILLed and restarted, kubelet and
# containerd restarted, Pods' containers killed, clients killed, the gateway SIGTERMed and
# SIGKILLed (then its janitor). Options via CHAOS_REAL_ARGS.
chaos-real: build
	./scripts/with-realcluster $(REALCLUSTER_DIR) env KUBERUN_REQUIRE_EXTENSIONS=1 \
		$(PY) -m tests.integration.chaos --real \
		$(or $(CHAOS_REAL_ARGS),--lifecycles 300 --epochs 4 --concurrency 6 --seed 1)

# kuberun against kubectl on the real path (benchmarks/real_path.py; results in
# benchmarks/RESULTS.md): throughput both ways, keystroke latency, Pod start, API calls.
.PHONY: bench-real
bench-real: build
	./scripts/with-realcluster $(REALCLUSTER_DIR) env KUBERUN_REQUIRE_EXTENSIONS=1 \
		$(PY) -m benchmarks.real_path $(BENCH_REAL_ARGS)
# The real single-node Kubernetes the real-cluster tiers run against: builds (and caches under
# ~/.cache/kuberun-realcluster) Kubernetes, etcd, containerd, runc, the CNI plugins and the
# images; starts nothing. `scripts/realcluster up DIR` / `down DIR` run it (see README).
.PHONY: realcluster
realcluster:
	./scripts/realcluster build
