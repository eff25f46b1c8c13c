# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test test-reliability test-fuzz test-container bench clean

install:
	@bash scripts/bootstrap.sh

demo: install
	$(PY) scripts/demo.py

# The container suite (the image built and played as a pod, ~3 minutes) is `make test-container`:
# .ci/run runs both, and `make test` stays within its 15 minutes on a loaded 2-core machine.
# Two test processes side by side (pytest-xdist): a mount test mostly waits for servers, mounts
# and process starts. The tests marked `serial` time an answer under a load they make
# themselves: they run after the others, alone (exit 5, none selected, only when PYTEST_ARGS
# narrows the run to tests without them).
TEST_JOBS ?= 2
test: install
	$(PY) -m pytest --ignore=tests/container -n $(TEST_JOBS) -m "not serial" $(PYTEST_ARGS)
	$(PY) -m pytest --ignore=tests/container -m serial $(PYTEST_ARGS) || [ $$? -eq 5 ]

# Every fault scenario, the long ones included (2 GiB on a slow link, 32 readers x 100 tries,
# writes at 50 transitions of each kind), and the variants `make test` leaves out for its bound.
test-reliability: install
	$(PY) -m pytest --reliability tests/mount/test_reliability.py tests/mount/test_faults.py tests/mount/test_path_hold.py tests/mount/test_small_files.py $(PYTEST_ARGS)

# The image built (podman; a Debian base made with mmdebstrap when no registry answers) and run
# as a session pod of two containers, then the unprivileged (fd passing) mode.
test-container: install
	@command -v podman >/dev/null && command -v mmdebstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc mmdebstrap >/dev/null; }
	bash container/build.sh
	$(PY) -m pytest tests/container tests/mount/test_mount_helper.py $(PYTEST_ARGS)

# The fuzz suite's long profile: >= 100,000 generated inputs across the five front doors.
test-fuzz: install
	FUZZ_PROFILE=long $(PY) -m pytest -s tests/fuzz $(PYTEST_ARGS)

bench:
	@bash scripts/bootstrap.sh --bench
	$(PY) -m benchmarks $(BENCH_ARGS)
	$(PY) -m benchmarks.link $(LINK_ARGS)
	$(PY) -m benchmarks.webdav $(WEBDAV_ARGS)
	$(PY) -m benchmarks.clients $(CLIENTS_ARGS)
	$(PY) -m benchmarks.training $(TRAINING_ARGS)
	$(PY) -m benchmarks.shared $(SHARED_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .demo
