#!/usr/bin/env bash
# One GPU session, in one command: what a CPU cannot show, most valuable first, within a budget.
#
#   bash bench/fetch_wheels.sh              # first, here (where pip works): .whl/, < 60 MiB
#   bash bench/gpu_session.sh quick         # on the GPU machine: fits one 10-minute call
#   bash bench/gpu_session.sh full          # the full bench grids (several calls' worth)
#   bash bench/gpu_session.sh --dry-run quick   # a CPU rehearsal of everything but the CUDA
#                                               # parts, in a device-like venv (see below)
#
# The GPU machine (bench/device-env.txt): Python 3.12, torch 2.11+cu130, triton 3.6.0,
# transformers 5.17.0 (too old: its forwards drop our image features), no trl / liger-kernel /
# datasets, no network. The overlay step installs from .whl/ what it lacks or has too old
# (bench/wheels.txt, rule in bench/overlay.py) into $OVERLAY, first on PYTHONPATH.
#
# Steps, in order of value, with their expected seconds on one H200 in `quick` (the budget,
# BUDGET_S=540 for quick, skips a step that would no longer fit, so the results of the steps
# before it come back; each step also has a hard limit). Estimates, from the work each does:
#   versions        5   python, torch, CUDA, triton, transformers, GPU; again after the overlay
#   overlay        15   pip --no-index --target of ~17 MiB of wheels (6-11 s on 2 CPU cores)
#   build          60   3 sources (1 .cu for this GPU's arch only, 2 .cpp), ninja, MAX_JOBS=16;
#                       the 2 .cpp take ~40 s of CPU here
#   ext             5   it loads, with CUDA kernels
#   gpu-tests     200   83 GPU tests (no -x: each reports), the model-level ones first, 120 s
#                       timeout per test (pytest-timeout, carried): ~30 s of imports and tiny
#                       model builds, ~2 s per test of Triton compiles and runs, 2 torch.compile
#   bench-noise    45   12 rows x ~0.3 s (do_bench: 50 ms warmup + 250 ms) + 2 torch.compile
#   bench-logprobs 60   2 shapes (8192 tokens, V 32000 / 152064) x 14 rows x ~0.5 s + compiles
#   bench-linear   60   2 shapes (8192 tokens, H 4096) x 9 rows x ~2.1 s (100 ms + 2 s) + compiles
#   total         450   of a 600 s call
# `full` runs the full grids of bench/noise.py, logprobs.py, linear.py, dpo_step.py, pairs.py
# (no budget unless BUDGET_S is set).
#
# Writes (and copies to $OUT after every step, so a call cut short still returns them):
#   bench/results/gpu-session-<gpu>-<mode>.txt   versions, overlay plan, one line per step
#   bench/results/gpu-tests-<gpu>.xml            JUnit: every GPU test's outcome and time
#   bench/results/{noise,logprobs,linear}-<gpu>-quick.json (quick), or <bench>-<gpu>.json (full)
#   bench/results/logs/<step>.log                each step's full output
# A failing step is logged and the next one runs; the exit status is 1 when any step failed.
#
# --dry-run: no CUDA. The extension is built for the CPU (same command), the GPU tests are
# collected (and skipped, no GPU), the CPU twins of the model-level GPU tests run (same code and
# tolerance, bf16 on the CPU), and each bench runs --smoke (one timed call per row). Like the
# real run it builds in place (bpo_fast/_C*.so, build/): tests/test_gpu_session.py runs it on a
# copy of the tracked files. Logs go to $LOG_DIR (default
# /tmp/bpo-gpu-session-dry-run), nothing is written under bench/results. Run it with the
# device-like venv's python3 first on PATH: `PATH=$(python bench/device_venv.py)/bin:$PATH`
# (Python 3.11 there, 3.12 on the machine; torch 2.13.0 CPU stands in for 2.11+cu130; fetch the
# wheels for it with PYTHON_VERSION=3.11 WHEEL_DIR=... bash bench/fetch_wheels.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
MODE=${1:-quick}
case "$MODE" in quick|full) ;; *) echo "usage: $0 [--dry-run] [quick|full]" >&2; exit 2 ;; esac
# the budget is the device call's (10 minutes); a rehearsal has none unless asked
if [ "$MODE" = quick ] && [ $DRY = 0 ]; then BUDGET_S=${BUDGET_S:-540}; else BUDGET_S=${BUDGET_S:-0}; fi
WHEELS=${WHEEL_DIR:-.whl}
OVERLAY=${OVERLAY:-${TMPDIR:-/tmp}/bpo-overlay}
if [ $DRY = 1 ]; then
    RESULTS=${LOG_DIR:-${TMPDIR:-/tmp}/bpo-gpu-session-dry-run}
    LOG_DIR=$RESULTS/logs
else
    RESULTS=bench/results
    LOG_DIR=${LOG_DIR:-$RESULTS/logs}
fi
mkdir -p "$LOG_DIR" "$RESULTS"
T0=$SECONDS
FAILED=()
SUMMARY=$LOG_DIR/summary.txt
: > "$SUMMARY"

say() { echo "$@" | tee -a "$SUMMARY"; }

sync_out() {  # results so far -> $OUT (the device call returns what is there when it ends)
    [ -n "${OUT:-}" ] || return 0
    mkdir -p "$OUT/logs"
    cp -f "$LOG_DIR"/*.log "$SUMMARY" "$OUT/logs/" 2>/dev/null
    find "$RESULTS" -maxdepth 1 -type f -newer "$LOG_DIR/.start" -exec cp -f {} "$OUT"/ \;
    return 0
}

step() {  # step NAME EXPECTED_S LIMIT_S COMMAND...: run within the budget, log, remember failures
    local name=$1 expected=$2 limit=$3; shift 3
    local used=$((SECONDS - T0)) t0=$SECONDS rc
    if [ "$BUDGET_S" -gt 0 ]; then
        local left=$((BUDGET_S - used))
        if [ "$left" -lt "$expected" ]; then
            say "$(printf '%-16s SKIPPED  (expected %s s, %s s of the budget left)' "$name" "$expected" "$left")"
            FAILED+=("$name(skipped)")
            return
        fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    echo "== $name (expected ${expected} s, limit ${limit} s): $*"
    timeout -k 10 "$limit" "$@" > "$LOG_DIR/$name.log" 2>&1
    rc=$?
    tail -n 8 "$LOG_DIR/$name.log"
    local status=ok
    if [ $rc = 124 ] || [ $rc = 137 ]; then status="TIMEOUT"; elif [ $rc != 0 ]; then status="FAILED($rc)"; fi
    [ $status = ok ] || FAILED+=("$name")
    say "$(printf '%-16s %-9s %4d s (expected %s s)' "$name" "$status" $((SECONDS - t0)) "$expected")"
    sync_out
}

versions() {
    python3 - <<'EOF'
import importlib.metadata as md
import platform
import sys

def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "-"

import torch

gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"python {platform.python_version()}  torch {torch.__version__}  CUDA {torch.version.cuda}  "
      f"GPU {gpu}")
print("  " + "  ".join(f"{n} {v(n)}" for n in (
    "triton", "transformers", "tokenizers", "huggingface-hub", "safetensors", "accelerate",
    "peft", "trl", "liger-kernel", "datasets", "pyarrow", "numpy", "pytest", "pytest-timeout")))
EOF
}

touch "$LOG_DIR/.start"     # results newer than this are this run's
say "gpu_session $MODE$([ $DRY = 1 ] && echo ' --dry-run')  $(date -u +%Y-%m-%dT%H:%M:%SZ)  $(git rev-parse --short HEAD 2>/dev/null)"
say "$(versions 2>&1)"
command -v nvidia-smi > /dev/null && say "$(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader)"

# ---- overlay: what the machine lacks or has too old, first on PYTHONPATH ---------------------
unset PYTHONPATH
if [ -d "$OVERLAY" ] && [ ! -f "$OVERLAY/.bpo-overlay" ] && [ -n "$(ls -A "$OVERLAY")" ]; then
    echo "OVERLAY=$OVERLAY is a folder this script did not make; set OVERLAY to a new path" >&2
    exit 2
fi
rm -rf "$OVERLAY"
mkdir -p "$OVERLAY"
touch "$OVERLAY/.bpo-overlay"
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    step overlay 15 120 python3 bench/overlay.py install "$WHEELS" --target "$OVERLAY" \
        --require transformers pytest
    cat "$LOG_DIR/overlay.log" >> "$SUMMARY"
else
    say "no $WHEELS/*.whl: nothing overlaid (run bench/fetch_wheels.sh where pip works)"
fi
export PYTHONPATH=$OVERLAY:$ROOT PATH=$OVERLAY/bin:$PATH
say "after the overlay: $(versions 2>&1 | tail -n 1)"

# ---- the extension ------------------------------------------------------------------------
# built in place (bpo_fast/_C*.so), found through PYTHONPATH: no pip, wheel or network needed
export MAX_JOBS=${MAX_JOBS:-16}
if [ $DRY = 1 ]; then   # the CPU build (torch has no CUDA): the same command, the same setup.py
    step build 60 400 python3 setup.py -q build_ext --inplace
    step ext 5 60 python3 -c "import bpo_fast, json; i = bpo_fast.extension_info(); print(json.dumps(i)); assert i['available'], i"
else
    # this GPU's arch only (setup.py's default builds 8.0 and 9.0+PTX)
    ARCH=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || ARCH="8.0;9.0+PTX"
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
    step build 60 240 python3 setup.py -q build_ext --inplace
    step ext 5 60 python3 -c "import bpo_fast, json; i = bpo_fast.extension_info(); print(json.dumps(i)); assert i['cuda'], i"
fi

# ---- GPU tests: each reports (no -x), each under its own timeout -----------------------------
# the model-level contract first (our log-probs = the HF forward's, images used), then the
# kernels, the noising op, the pipelines, then any other file (pytest keeps the order given)
TESTS=(tests/test_vlm_families.py tests/test_preference_model.py tests/test_linear.py
       tests/test_linear_softcap.py tests/test_logprobs.py tests/test_dpo.py tests/test_noise.py
       tests/test_pairs.py tests/test_train.py)
for f in tests/test_*.py; do [[ " ${TESTS[*]} " == *" $f "* ]] || TESTS+=("$f"); done
TIMEOUT_ARGS=()
# (the plugin loads itself when installed)
python3 -c "import pytest_timeout" 2> /dev/null && TIMEOUT_ARGS=(--timeout 120 --timeout-method signal)
GPU=$(python3 -c "from bench.common import gpu_slug; print(gpu_slug())" 2> /dev/null || echo gpu)
if [ $DRY = 1 ]; then
    # collection under the overlay (every GPU test is skipped without a GPU), then the CPU twins
    # of the model-level GPU tests: the same code and tolerance, bf16 on the CPU
    step gpu-tests 30 240 python3 -m pytest -q -m cuda "${TIMEOUT_ARGS[@]}" "${TESTS[@]}"
    step cpu-twins 60 300 python3 -m pytest -q "${TIMEOUT_ARGS[@]}" \
        "tests/test_preference_model.py::test_bf16_tolerance_rejects_dropped_images_on_cpu" \
        "tests/test_vlm_families.py::test_noise_floor_rule_on_cpu_bf16[qwen3_vl]" \
        "tests/test_vlm_families.py::test_dropped_images_are_an_error[llava_next]"
else
    step gpu-tests 200 330 python3 -m pytest -q -rfEs -m cuda "${TIMEOUT_ARGS[@]}" \
        --junitxml "$RESULTS/gpu-tests-$GPU.xml" "${TESTS[@]}"
fi

# ---- benches --------------------------------------------------------------------------------
if [ $DRY = 1 ]; then
    export BPO_BENCH_MAX_REPS=1   # the rows run and check; CPU timings would mean nothing
    step bench-noise 15 120 python3 bench/noise.py --smoke
    step bench-logprobs 45 180 python3 bench/logprobs.py --smoke
    step bench-linear 30 180 python3 bench/linear.py --smoke
    [ "$MODE" = full ] && step bench-dpo-step 60 300 python3 bench/dpo_step.py --smoke
    [ "$MODE" = full ] && step bench-pairs 60 300 python3 bench/pairs.py --smoke
elif [ "$MODE" = quick ]; then   # smaller grids, in their own files (never over a full grid's)
    step bench-noise 45 120 python3 bench/noise.py --all --batch 64 --levels 1 \
        --out "$RESULTS/noise-$GPU-quick.json"
    step bench-logprobs 60 150 python3 bench/logprobs.py --all --tokens 8192 --vocab 32000 152064 \
        --out "$RESULTS/logprobs-$GPU-quick.json"
    step bench-linear 60 150 python3 bench/linear.py --all --tokens 8192 --vocab 32000 152064 \
        --out "$RESULTS/linear-$GPU-quick.json"
else
    step bench-noise 120 600 python3 bench/noise.py --all
    step bench-logprobs 300 1200 python3 bench/logprobs.py --all
    step bench-linear 300 1200 python3 bench/linear.py --all
    step bench-dpo-step 600 1800 python3 bench/dpo_step.py --all
    step bench-pairs 300 1200 python3 bench/pairs.py
fi

say "total $((SECONDS - T0)) s"
[ $DRY = 1 ] || cp -f "$SUMMARY" "$RESULTS/gpu-session-$GPU-$MODE.txt"
sync_out
if [ ${#FAILED[@]} -gt 0 ]; then echo "failed steps: ${FAILED[*]}"; exit 1; fi
echo "all steps passed"
