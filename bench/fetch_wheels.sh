#!/usr/bin/env bash
# Where pip works: the wheels of bench/wheels.txt into .whl/ (gitignored) for a GPU machine that
# has no network; bench/gpu_session.sh installs there the ones the machine needs. No dependencies
# are resolved: bench/wheels.txt lists them, and `bench/overlay.py check` proves the set against
# the machine's documented software (bench/device-env.txt): nothing the machine already has as
# new (an overlay copy would shadow its own), every requirement met by the machine or the set,
# and under 60 MiB in all (a device call carries at most 64 MiB). .whl/ is replaced only when
# the check passes (the new set is left in .whl.tmp/ otherwise).
#
#   bash bench/fetch_wheels.sh                        # for the GPU machine: Python 3.12
#   PYTHON_VERSION=3.11 WHEEL_DIR=/tmp/w bash bench/fetch_wheels.sh
#                                                     # for a CPU rehearsal (bench/device_venv.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON_VERSION:-3.12}
DEST=${WHEEL_DIR:-.whl}
MAX_MIB=${MAX_MIB:-60}
rm -rf "$DEST.tmp"
mkdir -p "$DEST.tmp"

# one pip call per round, each name at most once per round (pip refuses two versions of one
# name in a call; bench/wheels.txt carries two of datasets)
mapfile -t specs < <(sed 's/#.*//' bench/wheels.txt | awk 'NF {print $1}')
while [ ${#specs[@]} -gt 0 ]; do
    declare -A seen=()
    round=() rest=()
    for spec in "${specs[@]}"; do
        name=${spec%%[=<>!~]*}
        if [ -n "${seen[$name]:-}" ]; then rest+=("$spec"); else seen[$name]=1; round+=("$spec"); fi
    done
    unset seen
    python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version "$PY" --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST.tmp" \
        "${round[@]}"
    specs=("${rest[@]+"${rest[@]}"}")
done

python3 bench/overlay.py check "$DEST.tmp" --device bench/device-env.txt --python "$PY" \
    --max-mib "$MAX_MIB"
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
du -sh "$DEST"
