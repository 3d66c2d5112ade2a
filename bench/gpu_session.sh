#!/usr/bin/env bash
# Everything CPU cannot show, in one command on a CUDA machine (no network needed):
# build the CUDA extension, run the GPU-marked tests (bf16/fp16 kernels, the CUDA noising op,
# the trainer and pair builder on CUDA), then every benchmark's full grid. Results land in
# bench/results/<bench>-<gpu>.json (and a copy under $OUT when set); logs in $LOG_DIR.
#
#   bash bench/fetch_wheels.sh          # first, where pip works: TRL / Liger wheels into .whl/
#   bash bench/gpu_session.sh [quick]   # on the GPU ("quick": tests + the smaller bench grids)
#
# A failing step is logged and the script goes on with the next one; it exits non-zero at the
# end when any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-full}
LOG_DIR=${LOG_DIR:-${OUT:-bench/results}/logs}
mkdir -p "$LOG_DIR" bench/results
FAILED=()

step() {  # step NAME COMMAND...: run, tee to $LOG_DIR/NAME.log, remember failures
    local name=$1; shift
    echo "== $name: $*"
    local t0=$SECONDS
    if ! "$@" > "$LOG_DIR/$name.log" 2>&1; then FAILED+=("$name"); echo "   FAILED"; fi
    tail -n 5 "$LOG_DIR/$name.log"
    echo "   ($((SECONDS - t0)) s)"
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/bpo-site .whl/*.whl && export PYTHONPATH=/tmp/bpo-site${PYTHONPATH:+:$PYTHONPATH}
    TRL_WHEEL=$(ls .whl/trl-*.whl 2>/dev/null | head -1); export TRL_WHEEL
    LIGER_WHEEL=$(ls .whl/liger_kernel-*.whl 2>/dev/null | head -1); export LIGER_WHEEL
else
    echo "no .whl/: TRL and Liger rows are skipped (run bench/fetch_wheels.sh where pip works)"
fi

# build for this GPU only (faster than setup.py's default 8.0;9.0+PTX); override by exporting it
ARCH=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || ARCH="8.0;9.0+PTX"
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
touch "$LOG_DIR/.start"     # results newer than this are this run's
step build python3 -m pip install -q --no-build-isolation --no-deps -e .
step ext python3 -c "import bpo_fast, json; i = bpo_fast.extension_info(); print(json.dumps(i)); assert i['cuda'], i"
step tests python3 -m pytest -q -x -m cuda tests
if [ "$MODE" = quick ]; then   # smaller grids, in their own files (never over a full grid's)
    GPU=$(python3 -c "from bench.common import gpu_slug; print(gpu_slug())")
    step bench-noise python3 bench/noise.py --all --batch 64 --levels 1 \
        --out "bench/results/noise-$GPU-quick.json"
    step bench-logprobs python3 bench/logprobs.py --all --tokens 8192 --vocab 32000 152064 \
        --out "bench/results/logprobs-$GPU-quick.json"
    step bench-linear python3 bench/linear.py --all --tokens 8192 --vocab 32000 152064 \
        --out "bench/results/linear-$GPU-quick.json"
else
    step bench-noise python3 bench/noise.py --all
    step bench-logprobs python3 bench/logprobs.py --all
    step bench-linear python3 bench/linear.py --all
    step bench-dpo-step python3 bench/dpo_step.py --all
    step bench-pairs python3 bench/pairs.py
fi
if [ -n "${OUT:-}" ]; then
    find bench/results -maxdepth 1 -name '*.json' -newer "$LOG_DIR/.start" -exec cp {} "$OUT"/ \;
fi
if [ ${#FAILED[@]} -gt 0 ]; then echo "failed steps: ${FAILED[*]}"; exit 1; fi
echo "all steps passed"
