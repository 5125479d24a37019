# make test: set up (venv, torch, build with the CUDA sources when nvcc is present) and run the tests.
# make bench: set up and run the benchmark on whatever device is present (CPU by default).
# make demo: set up and run the training demo (scikit-learn's digits; DEMO_ARGS="--epochs 40 --plot demo.png").
# make build-emu: the test-only extension _C_emu (the CUDA sources on the CPU emulator of csrc/emu); make test
#   builds it and runs its `emulated_cuda` tests with the others.
# make sanitize: _C_emu under AddressSanitizer + UBSan (as _C_emu_san), and the emulated tests against it.
# make mutants: the emulated tests against deliberately broken copies of the kernels (not in CI; slow).
# make sass-gate: the machine-code gate on the built _C (tools/sass_gate.py; no GPU needed).
# Another torch release, in its own venv: make test TORCH=2.11.0 VENV=.venv-torch2.11.0 (what .ci/run does).
# The in-place builds (tripletloss_cuda/_C*.so) belong to one venv at a time: switching venvs rebuilds them,
# each venv with its own build folder.
TORCH ?= 2.14.1
VENV ?= .venv
BUILD_TEMP = build/$(notdir $(VENV))
PY := $(VENV)/bin/python
RUN := PYTHONPATH=$(CURDIR) $(PY)
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu)
BENCH_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup build build-emu test sanitize mutants sass-gate bench demo lint clean

setup: $(VENV)/.setup-done
$(VENV)/.setup-done: requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "torch==$(TORCH)" -r requirements-dev.txt
	touch $@

# In-place, incremental (ninja) build of tripletloss_cuda/_C*.so.
build: $(VENV)/.build-done
$(VENV)/.build-done: $(VENV)/.setup-done $(SOURCES)
	rm -f .venv*/.build-done
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) setup.py -q build_ext --inplace --build-temp $(BUILD_TEMP)
	touch $@

# The emulated build: its own folder (build/emu-1), tripletloss_cuda/_C_emu*.so; never part of an install.
build-emu: $(VENV)/.build-emu-done
$(VENV)/.build-emu-done: $(VENV)/.setup-done $(SOURCES)
	rm -f .venv*/.build-emu-done
	TRIPLETLOSS_EMULATED=1 MAX_JOBS=$${MAX_JOBS:-2} $(PY) setup.py -q build_ext --inplace --build-temp $(BUILD_TEMP)-emu
	touch $@

test: build build-emu
	$(RUN) -m pytest -q tests benchmarks/test_bench.py

# ASan needs its runtime first in the process (python is not built with it): LD_PRELOAD, with libstdc++ (for
# its __cxa_throw interceptor, which C++ exceptions thrown in kernels go through). Leaks are not
# checked (the interpreter's own). -s: a sanitizer's report (it stops the process) is not lost in pytest's
# capture. SANITIZE_TESTS: the emulated tests to run (default: a representative part).
SANITIZE_TESTS ?= tests/test_emulated.py tests/test_sanitizer.py -k "not test_block_order and not test_launch_mappings or 4sm"
sanitize: build
	TRIPLETLOSS_EMULATED=sanitize MAX_JOBS=$${MAX_JOBS:-2} $(PY) setup.py -q build_ext --inplace --build-temp $(BUILD_TEMP)-san
	TRIPLETLOSS_EMU=sanitize LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
	  $(RUN) -m pytest -q -s -p no:cacheprovider $(SANITIZE_TESTS)

mutants: setup build
	$(PY) tests/mutants.py
	$(PY) tests/mutants.py --sanitize scalar_tail_off_by_one vectorize_misaligned

bench: build
	$(RUN) -m tripletloss_cuda bench $(BENCH_ARGS)

demo: build
	$(RUN) -m tripletloss_cuda demo $(DEMO_ARGS)

lint: setup
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check tripletloss_cuda tests benchmarks setup.py tools
	$(PY) -m ruff format --check tripletloss_cuda tests benchmarks setup.py tools

sass-gate: build
	$(PY) tools/sass_gate.py

clean:
	rm -rf build tripletloss_cuda/_C*.so .venv*/.build-done .venv*/.build-emu-done
