# Two commands do all set-up on a fresh Debian 12 machine (as root): `make test` and `make demo`.
# Everything is idempotent: a second run only re-runs the checks.

SHELL := /bin/bash
PY := /usr/bin/python3
VENV := .venv
VPY := $(VENV)/bin/python
# Debian packages the suite needs; installed only when dpkg-query says one is missing.
DEB_PACKAGES := python3 python3-venv python3-dev gcc libseccomp2 e2fsprogs postgresql curl iproute2 systemd util-linux nodejs
STAMP := $(VENV)/.installed

.PHONY: test demo bench bench-deps lint typecheck pytest deps clean soak deb

deps: $(STAMP)

$(STAMP): pyproject.toml
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test,bench,providers]'
	@touch $(STAMP)

# mypy cannot see setuptools' package-dir mapping; a symlink farm shows it the faramesh.* namespace.
.typecheck/faramesh/__init__.py: $(wildcard faramesh_pkg/*.py)
	@mkdir -p .typecheck/faramesh
	@for f in faramesh_pkg/*.py; do ln -sfn ../../$$f .typecheck/faramesh/$$(basename $$f); done
	@for p in engine sandbox supervisor launchers; do ln -sfn ../../$$p .typecheck/faramesh/$$p; done

lint: deps
	$(VENV)/bin/ruff check engine sandbox supervisor launchers faramesh_pkg tests bench packaging/build_deb.py

typecheck: deps .typecheck/faramesh/__init__.py
	MYPYPATH=.typecheck $(VENV)/bin/mypy --explicit-package-bases -p faramesh
	$(VENV)/bin/mypy --strict packaging/build_deb.py

pytest: deps
	@$(VPY) -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

test: lint typecheck pytest

demo: deps
	$(VPY) examples/support-bot/demo.py

# The launch benchmark's peers (bench/launch_bench.py), installed only when dpkg-query says one is missing.
BENCH_DEB_PACKAGES := bubblewrap firejail tinyproxy

bench-deps:
	@missing=""; for p in $(BENCH_DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

bench: deps bench-deps
	$(VPY) bench/run.py

# The crash test at length: 500 SIGKILL rounds under load (25 run in `make test`).
soak: deps
	FARAMESH_CRASH_ROUNDS=$${FARAMESH_CRASH_ROUNDS:-500} $(VPY) -m pytest -q -s -p no:cacheprovider tests/test_crash.py

# The .deb (packaging/README.md): a self-contained virtualenv under /opt/faramesh, /usr/bin/faramesh, the units.
deb:
	packaging/build-deb

clean:
	rm -rf $(VENV) .typecheck .mypy_cache .ruff_cache .pytest_cache
