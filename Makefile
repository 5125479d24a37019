# make test: set up (venv, torch, build with the CUDA sources when nvcc is present) and run the tests.
# make bench: set up and run the benchmark on whatever device is present (CPU by default).
# make demo: set up and run the training demo (scikit-learn's digits; DEMO_ARGS="--epochs 40 --plot demo.png").
# Another torch release, in its own venv: make test TORCH=2.11.0 VENV=.venv-torch2.11.0 (what .ci/run does).
# The in-place build (tripletloss_cuda/_C*.so) belongs to one venv at a time: switching venvs rebuilds it.
TORCH ?= 2.14.1
VENV ?= .venv
PY := $(VENV)/bin/python
RUN := PYTHONPATH=$(CURDIR) $(PY)
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu)
BENCH_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup build test bench demo lint sass-gate clean

setup: $(VENV)/.setup-done
$(VENV)/.setup-done: requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "torch==$(TORCH)" -r requirements-dev.txt
	touch $@

# In-place, incremental (ninja) build of tripletloss_cuda/_C*.so.
build: $(VENV)/.build-done
$(VENV)/.build-done: $(VENV)/.setup-done $(SOURCES)
	rm -f .venv*/.build-done
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) setup.py -q build_ext --inplace --build-temp build/$(notdir $(VENV))
	touch $@

test: build
	$(RUN) -m pytest -q tests benchmarks/test_bench.py

bench: build
	$(RUN) -m tripletloss_cuda bench $(BENCH_ARGS)

demo: build
	$(RUN) -m tripletloss_cuda demo $(DEMO_ARGS)

lint: setup
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check tripletloss_cuda tests benchmarks setup.py
	$(PY) -m ruff format --check tripletloss_cuda tests benchmarks setup.py

# The machine-code gate (no GPU needed): no spills, 128-bit loads/stores where vectorized (tools/sass_gate.py).
sass-gate: build
	$(PY) tools/sass_gate.py

clean:
	rm -rf build tripletloss_cuda/_C*.so .venv*/.build-done
