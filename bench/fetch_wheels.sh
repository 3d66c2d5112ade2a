#!/usr/bin/env bash
# On a machine with package-registry access: fetch the pure-Python baselines the GPU benches
# compare against (TRL, Liger-Kernel) as wheels into .whl/ (gitignored), without their
# dependencies, for a GPU machine that has no network. bench/gpu_session.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
TRL=${TRL_VERSION:-1.16.0}
LIGER=${LIGER_VERSION:-0.8.5}
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "trl==$TRL" "liger-kernel==$LIGER"
# what TRL's DPOTrainer needs beyond torch/transformers/accelerate (the `trl` rows of
# bench/dpo_step.py run the real trainer)
grep -v '^trl==' bench/requirements-trl.txt | python3 -m pip download -q --no-deps \
    --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl -r /dev/stdin
ls -l .whl
