#!/usr/bin/env bash
# Build, test, sanitize and benchmark tripletloss_cuda on a GPU machine, offline: it installs nothing.
#
#   bash benchmarks/gpu_check.sh OUTDIR        # from the repository root; about 5 to 7 minutes on an H200
#
# Steps: system (nvidia-smi, versions); build (setup.py build_ext --inplace, CUDA kernels forced, sm_90);
# info (tl.info() has the CUDA kernels); check (`python3 -m tripletloss_cuda check`: gradcheck, values and
# gradients on CPU and CUDA); demo (the training demo on CUDA, when scikit-learn is there); tests (pytest -m
# cuda, skipped without pytest); memcheck and racecheck (compute-sanitizer on tools/sanitize_cases.py);
# leak (benchmarks/leak_check.py, 3,000 steps); bench (`python3 -m tripletloss_cuda bench --device cuda`, with
# --plot when matplotlib is there); bench_mining_split and bench_mining (the mining ops next to the distance
# matrix's product; the three losses at N = 1024, 4096, 16384 against pytorch-metric-learning). Each step is
# timed and logged, and the next steps run after a failure, except those that need what failed.
# OUTDIR gets: gpu_check.log (everything), gpu_check_summary.json (per step: status pass/fail/skipped, seconds,
# exit code; rewritten after every step), demo_cuda.json, bench_cuda.json (and bench_cuda.png), and the
# benchmark's cuda-<date>.json and .md.
#
# Environment: GPU_CHECK_BUDGET (seconds for all the steps, default 540: a step's timeout is cut to what is
# left), GIT_COMMIT (recorded as the commit where the copy has no .git), CUDA_HOME (default: /usr/local/cuda
# or the toolkit of the nvcc on PATH), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default 16).
set -u -o pipefail

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
export OUT
BUDGET=${GPU_CHECK_BUDGET:-540}
STEPS=$(mktemp)        # one line a step: name, status, seconds, exit code, note (tab-separated)
STARTED=$(mktemp)      # benchmark results newer than this file were written by this run
GIT_COMMIT=${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
DEVICE_NAME=unknown
TORCH_VERSION=unknown

log() { printf '[%s +%3ds] %s\n' "$(date -u +%H:%M:%S)" "$SECONDS" "$*"; }

write_summary() {
    DEVICE_NAME=$DEVICE_NAME TORCH_VERSION=$TORCH_VERSION GIT_COMMIT=$GIT_COMMIT ELAPSED=$SECONDS BUDGET=$BUDGET \
        python3 - "$STEPS" "$OUT/gpu_check_summary.json" <<'EOF'
import datetime, json, os, sys

steps = []
for line in open(sys.argv[1]):
    name, status, seconds, rc, note = line.rstrip("\n").split("\t")
    steps.append({"step": name, "status": status, "seconds": int(seconds), "rc": int(rc) if rc else None,
                  "note": note or None})
summary = {
    "ok": all(s["status"] == "pass" for s in steps),
    "device": os.environ["DEVICE_NAME"],
    "torch": os.environ["TORCH_VERSION"],
    "git_commit": os.environ["GIT_COMMIT"],
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "elapsed_s": int(os.environ["ELAPSED"]),
    "budget_s": int(os.environ["BUDGET"]),
    "steps": steps,
}
with open(sys.argv[2], "w") as f:
    json.dump(summary, f, indent=1)
EOF
}

record() {  # record NAME STATUS SECONDS RC NOTE
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$STEPS"
    log "--- $1: $2 (${3}s${4:+, exit $4})${5:+: $5}"
    write_summary
}

skip() { record "$1" skipped 0 "" "$2"; }

step() {  # step NAME TIMEOUT COMMAND: run the bash COMMAND with TIMEOUT cut to the budget left; its exit code
    local name=$1 limit=$2 cmd=$3 left=$((BUDGET - SECONDS - 20)) t0=$SECONDS rc=0 note=""
    if ((left < 15)); then
        skip "$name" "no time left in the ${BUDGET}s budget"
        return 1
    fi
    ((limit > left)) && limit=$left
    log "=== $name (timeout ${limit}s): $cmd"
    timeout -k 10 "$limit" bash -c "$cmd" || rc=$?
    ((rc == 124 || rc == 137)) && note="timed out after ${limit}s"
    record "$name" "$([[ $rc == 0 ]] && echo pass || echo fail)" $((SECONDS - t0)) "$rc" "$note"
    return "$rc"
}

main() {
    log "gpu_check in $PWD, results to $OUT, budget ${BUDGET}s, commit $GIT_COMMIT"
    step system 60 'nvidia-smi; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
        python3 --version; python3 -c "import torch; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda)"
        command -v nvcc && nvcc --version | tail -2; python3 -c "import ninja" || echo "no ninja: one file at a time"'
    DEVICE_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
    TORCH_VERSION=$(python3 -c "import torch; print(torch.__version__)" 2>/dev/null)

    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} TRIPLETLOSS_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} GIT_COMMIT
    if [[ -z ${CUDA_HOME:-} ]]; then  # the toolkit itself, not the parent of a wrapper script on PATH
        local nvcc home
        nvcc=$(command -v nvcc || true)
        for home in /usr/local/cuda ${nvcc:+"$(dirname "$(dirname "$(readlink -f "$nvcc")")")"}; do
            [[ -x $home/bin/nvcc && -f $home/include/cuda_runtime.h ]] && export CUDA_HOME=$home && break
        done
    fi
    log "CUDA_HOME=${CUDA_HOME:-unset} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"

    if ! step build 300 'python3 setup.py build_ext --inplace'; then
        local name
        for name in info check demo tests memcheck racecheck leak bench bench_cosine bench_mining_split bench_mining \
            bench_integrations; do skip "$name" "build failed"; done
        return 1
    fi
    local kernels=1
    step info 60 'python3 -c "import tripletloss_cuda as tl; i = tl.info(); print(i); assert i[\"cuda_device\"] and \
        \"cuda\" in i[\"kernels\"], \"no CUDA device or kernel\""' || kernels=0
    step check 120 'python3 -m tripletloss_cuda check'
    if python3 -c "import sklearn" 2>/dev/null; then
        step demo 120 'python3 -m tripletloss_cuda demo --device cuda --no-progress --json "$OUT/demo_cuda.json"'
    else
        skip demo "scikit-learn is not installed"
    fi

    if python3 -c "import pytest" 2>/dev/null; then
        python3 -c "import hypothesis" 2>/dev/null || log "note: hypothesis is not installed"
        step tests 150 'python3 -m pytest -x -q -p no:cacheprovider tests -m cuda'
    else
        skip tests "pytest is not installed"
    fi

    local sanitizer tool flags="--error-exitcode 1 --print-limit 20" cases="python3 tools/sanitize_cases.py"
    sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
    for tool in memcheck racecheck; do
        if ((!kernels)); then
            skip "$tool" "no CUDA kernel"
        elif [[ ! -x $sanitizer ]]; then
            skip "$tool" "compute-sanitizer not found"
        else  # no caching allocator: each tensor is its own allocation, so out-of-bounds accesses are caught
            step "$tool" 120 "PYTORCH_NO_CUDA_MEMORY_CACHING=1 '$sanitizer' --tool $tool $flags $cases"
        fi
    done

    if ((kernels)); then  # memory over many training steps (CUDA allocated memory and RSS stay flat)
        step leak 60 'python3 benchmarks/leak_check.py --device cuda --steps 3000 --json "$OUT/leak_cuda.json"'
    else
        skip leak "no CUDA kernel"
    fi

    if ((kernels)); then
        step bench 240 'plot=(); python3 -c "import matplotlib" 2>/dev/null && plot=(--plot "$OUT/bench_cuda.png")
            python3 -m tripletloss_cuda bench --device cuda --no-progress --json "$OUT/bench_cuda.json" "${plot[@]}"'
        find benchmarks/results -name 'cuda-*' -newer "$STARTED" -exec cp {} "$OUT/" \;
        # issue 17: the cosine distance, fused, against F.triplet_margin_with_distance_loss eager and compiled
        step bench_cosine 150 'python3 -m tripletloss_cuda bench --device cuda --distance cosine --modes fwdbwd \
            --no-progress --out-dir "" --json "$OUT/bench_cosine_cuda.json"'
    else
        skip bench "no CUDA kernel"
        skip bench_cosine "no CUDA kernel"
    fi
    if ((kernels)); then  # issue 10: the mining losses against pml, and the mining ops next to the matrix product
        step bench_mining_split 90 'python3 -m tripletloss_cuda bench --mining --split --device cuda \
            --json "$OUT/mining_split_cuda.json"'
        step bench_mining 180 'python3 -m tripletloss_cuda bench --mining --device cuda --n 1024,4096,16384 --d 128 \
            --per-class 32 --impls tl,pml --repeats 5 --json "$OUT/mining_cuda.json"'
        find benchmarks/results -name 'mining-*cuda-*' -newer "$STARTED" -exec cp {} "$OUT/" \;
    else
        skip bench_mining_split "no CUDA kernel"
        skip bench_mining "no CUDA kernel"
    fi
    if ((kernels)) && python3 -c "import pytorch_metric_learning" 2>/dev/null; then
        step bench_integrations 240 'python3 -m tripletloss_cuda bench --integrations --device cuda'
        find benchmarks/results -name 'integrations-cuda-*' -newer "$STARTED" -exec cp {} "$OUT/" \;
    else
        skip bench_integrations "no CUDA kernel or pytorch-metric-learning"
    fi
    log "done in ${SECONDS}s: $(grep -c $'\tpass\t' "$STEPS") passed, $(grep -c $'\tfail\t' "$STEPS") failed," \
        "$(grep -c $'\tskipped\t' "$STEPS") skipped"
    ! grep -q $'\tfail\t' "$STEPS"
}

main 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
rm -f "$STEPS" "$STARTED"
exit "$rc"
