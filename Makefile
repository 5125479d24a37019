# make test: set up (venv, torch, build with the CUDA sources when nvcc is present) and run the tests.
# make test WHEEL=dist/<wheel>: the same suite against that wheel installed into the venv, run from outside the
#   checkout (so no in-place _C can be picked up): what .ci/run does for every torch release it claims.
# make wheel: the abi3 wheel (dist/), with the CUDA kernels when nvcc is present, for torch >= 2.11.
# make bench: set up and run the benchmark on whatever device is present (CPU by default).
# make demo: set up and run the training demo (scikit-learn's digits; DEMO_ARGS="--epochs 40 --plot demo.png").
# make build-emu: the test-only extension tripletloss_emu (the CUDA sources on the CPU emulator of csrc/emu),
#   built into $(EMU_LIB); make test builds it and runs its `emulated_cuda` tests with the others.
# make sanitize: the emulated build under AddressSanitizer + UBSan (tripletloss_emu_san), and the emulated tests.
# make mutants: the emulated tests against deliberately broken copies of the kernels (not in CI; slow).
# make lint: ruff check, ruff format --check and clang-format --dry-run (.clang-format) on the sources.
# make sass-gate: the machine-code gate on the built _C (tools/sass_gate.py; no GPU needed).
# Another torch release, in its own venv: make test TORCH=2.11.0 VENV=.venv-torch2.11.0.
# The in-place build (tripletloss_cuda/_C.abi3.so) serves every venv with torch >= 2.11 (the stable ABI); each
# venv has its own build folder, and its own emulated build.
TORCH ?= 2.14.1
VENV ?= .venv
WHEEL ?=
BUILD_TEMP = build/$(notdir $(VENV))
# EMU_FROM=<folder>: the emulated build another venv made, used as it is (it is on the stable ABI as well, so one
#   build serves every torch >= 2.11 on the same CPython); make test then builds none (.ci/run: one build, 2.11).
EMU_FROM ?=
EMU_LIB = $(if $(EMU_FROM),$(abspath $(EMU_FROM)),$(CURDIR)/build/$(notdir $(VENV))-emu)
EMU_BUILD = $(if $(EMU_FROM),,build-emu)
PY := $(VENV)/bin/python
RUN := PYTHONPATH=$(CURDIR) $(PY)
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu)
# The in-place build compiles one GPU architecture (fast); a wheel compiles setup.py's DEFAULT_CUDA_ARCHS.
INPLACE_ARCHS ?= 9.0
BENCH_ARGS ?=
DEMO_ARGS ?=
TESTS := tests
EMU_ENV := TRIPLETLOSS_EMU_LIB=$(EMU_LIB)

.PHONY: setup build build-emu test wheel sanitize mutants sass-gate bench demo lint clean

setup: $(VENV)/.setup-done
$(VENV)/.setup-done: requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "torch==$(TORCH)" -r requirements-dev.txt
	touch $@

# In-place, incremental (ninja) build of tripletloss_cuda/_C.abi3.so. A _C of another suffix (a build from
# before the stable ABI, for one CPython) would shadow it, so it goes.
build: $(VENV)/.build-done
$(VENV)/.build-done: $(VENV)/.setup-done $(SOURCES)
	rm -f .venv*/.build-done tripletloss_cuda/_C.cpython-*.so
	TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-$(INPLACE_ARCHS)} MAX_JOBS=$${MAX_JOBS:-2} \
	  $(PY) setup.py -q build_ext --inplace --build-temp $(BUILD_TEMP)
	touch $@

# The emulated build: its own folders (build/emu-1 for objects, $(EMU_LIB) for the module); never installed.
build-emu: $(VENV)/.build-emu-done
$(VENV)/.build-emu-done: $(VENV)/.setup-done $(SOURCES)
	TRIPLETLOSS_EMULATED=1 MAX_JOBS=$${MAX_JOBS:-2} $(PY) setup.py -q build_ext --build-lib $(EMU_LIB) \
	  --build-temp $(BUILD_TEMP)-emu
	touch $@

wheel: setup
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip wheel -q --no-build-isolation --no-deps -w dist .
	ls -l dist/*.whl

ifeq ($(WHEEL),)
test: build $(EMU_BUILD)
	$(EMU_ENV) $(RUN) -m pytest -q $(TESTS)
else
# The wheel into the venv (replacing any earlier install), then the suite from a folder outside the checkout,
# without PYTHONPATH: `import tripletloss_cuda` is the installed package (conftest.py checks it is).
TEST_CWD = $(CURDIR)/build/$(notdir $(VENV))-cwd
test: setup $(EMU_BUILD)
	$(PY) -m pip install -q --force-reinstall --no-deps $(abspath $(WHEEL))
	mkdir -p $(TEST_CWD)
	cd $(TEST_CWD) && $(EMU_ENV) TRIPLETLOSS_EXPECT_INSTALLED=1 $(abspath $(PY)) -m pytest -q -p no:cacheprovider \
	  --rootdir=$(CURDIR) -c $(CURDIR)/pyproject.toml $(addprefix $(CURDIR)/,$(TESTS))
endif

# ASan needs its runtime first in the process (python is not built with it): LD_PRELOAD, with libstdc++ (for
# its __cxa_throw interceptor, which C++ exceptions thrown in kernels go through). Leaks are not
# checked (the interpreter's own). -s: a sanitizer's report (it stops the process) is not lost in pytest's
# capture. SANITIZE_TESTS: the emulated tests to run (default: a representative part).
SANITIZE_TESTS ?= tests/emulated -k "not test_block_order and not test_launch_mappings or 4sm"
sanitize: build
	TRIPLETLOSS_EMULATED=sanitize MAX_JOBS=$${MAX_JOBS:-2} $(PY) setup.py -q build_ext --build-lib $(EMU_LIB) \
	  --build-temp $(BUILD_TEMP)-san
	TRIPLETLOSS_EMU=sanitize $(EMU_ENV) \
	  LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
	  $(RUN) -m pytest -q -s -p no:cacheprovider $(SANITIZE_TESTS)

mutants: setup build
	$(PY) tools/mutants.py
	$(PY) tools/mutants.py --sanitize scalar_tail_off_by_one vectorize_misaligned

bench: build
	$(RUN) -m tripletloss_cuda bench $(BENCH_ARGS)

demo: build
	$(RUN) -m tripletloss_cuda demo $(DEMO_ARGS)

# Lint: ruff (Python) and clang-format (csrc/, the style of .clang-format), both pinned; in CI.
LINT_TOOLS := ruff==0.17.6 clang-format==23.1.5
PY_SOURCES := tripletloss_cuda tests benchmarks tools setup.py
CXX_SOURCES := $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu)
lint: setup
	$(PY) -m pip install -q $(LINT_TOOLS)
	$(PY) -m ruff check $(PY_SOURCES)
	$(PY) -m ruff format --check $(PY_SOURCES)
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

sass-gate: build
	$(PY) tools/sass_gate.py

clean:
	rm -rf build dist tripletloss_cuda/_C*.so .venv*/.build-done .venv*/.build-emu-done
