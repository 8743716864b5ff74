# adaptfuse: `make test` installs everything into .venv, builds, and runs the CI tier;
# `make demo` runs the main job. Both work on a fresh machine with Python 3.10+ and,
# optionally, nvcc (the CUDA kernels are compiled whenever nvcc is found).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1's CUDA 13.0 wheels pair with nvcc 13.0; override to match another toolkit.
TORCH_SPEC ?= torch==2.14.1
STAMPS := $(VENV)/.adaptfuse-stamps
PYTEST_ARGS ?=
STAGE ?= build-test

.PHONY: install build ctest test test-full demo bench lint gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Dependencies once per venv (and again when pyproject.toml changes). The build uses the
# installed torch: --no-build-isolation, never a torch fetched for an isolated build.
$(STAMPS)/deps: pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	mkdir -p $(STAMPS) && touch $@

install: $(STAMPS)/deps

# Incremental (ninja) rebuild of the extension in place.
build: $(STAMPS)/deps
	$(PY) setup.py -q build_ext --inplace

# The torch-free kernel project (cmake/) under ctest: the shared arithmetic, the emulator's own
# tests, and the same emulator tests under AddressSanitizer (out-of-bounds accesses caught).
ctest:
	cmake -S cmake -B cmake-build -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build cmake-build -j2
	ctest --test-dir cmake-build --output-on-failure
	cmake -S cmake -B cmake-build-asan -DCMAKE_BUILD_TYPE=Debug -DADAPTFUSE_ASAN=ON > /dev/null
	cmake --build cmake-build-asan -j2 --target emu_test
	ctest --test-dir cmake-build-asan --output-on-failure -R emulator

test: build lint ctest
	$(PY) scripts/run_pytest.py -m "not slow" --durations=25 $(PYTEST_ARGS)

test-full: build
	$(PY) scripts/run_pytest.py -m "" --durations=25 $(PYTEST_ARGS)

demo: build
	$(PY) -m adaptfuse.cli demo

bench: build
	$(PY) benchmarks/bench_ops.py
	$(PY) benchmarks/bench_merge.py

lint: $(STAMPS)/deps
	$(PY) -m pip install -q ruff clang-format
	$(PY) -m ruff check adaptfuse tests benchmarks scripts examples
	$(VENV)/bin/clang-format --dry-run --Werror --style=file $$(find csrc cmake/tests -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

# On a GPU machine, with its own Python and torch (no venv, no network): builds for the
# local GPU only and runs one stage (build-test, sanitize, bench), each under 8 minutes.
gpu-check:
	bash scripts/gpu_check.sh $(STAGE)

clean:
	rm -rf build cmake-build cmake-build-asan adaptfuse/_C*.so adaptfuse/_emu*.so *.egg-info
