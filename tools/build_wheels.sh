#!/usr/bin/env bash
# Build CUDA wheels of bpo-fast on a GPU-less node, and check them.
#
#   tools/build_wheels.sh [OUT_DIR]        (default: dist/)
#
# 1. a throw-away venv gets the registry's CUDA torch (PyPI's torch==$TORCH_VERSION, a cu13x
#    build; pip runs --isolated so that a local CPU wheel in find-links/constraints cannot win);
# 2. `pip wheel` builds bpo-fast from a copy of the working tree (tracked + untracked files) with
#    FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCHS" (CUDA_HOME: see setup.py);
# 3. cuobjdump checks that the .so holds SASS for sm_80 and sm_90 and PTX for sm_90;
# 4. the wheel is installed into the venv and imported on the CPU (the CUDA torch loads without a
#    GPU), and the CPU noise tests run against the installed wheel (not the source tree).
# Not part of CI: it downloads ~5 GB and compiles for minutes. Env: TORCH_VERSION (2.13.0),
# ARCHS ("8.0;9.0+PTX"), MAX_JOBS (2), KEEP_VENV=1 keeps the venv (its path is printed),
# PIP_INDEX (https://pypi.org/simple).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$(realpath -m "${1:-dist}")
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
ARCHS=${ARCHS:-"8.0;9.0+PTX"}
PIP_INDEX=${PIP_INDEX:-https://pypi.org/simple}
export MAX_JOBS=${MAX_JOBS:-2}
PY=${PYTHON:-python3}

work=$(mktemp -d "${TMPDIR:-/tmp}/bpo-fast-wheels.XXXXXX")
cleanup() { if [ "${KEEP_VENV:-0}" = 1 ]; then echo "kept: $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

stamp "venv + torch==$TORCH_VERSION from $PIP_INDEX"
"$PY" -m venv "$work/venv"
VPY="$work/venv/bin/python"
PIP=("$VPY" -m pip --isolated --disable-pip-version-check)
"${PIP[@]}" install -q --index-url "$PIP_INDEX" "torch==$TORCH_VERSION" setuptools wheel ninja \
  numpy pytest
"$VPY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
assert torch.version.cuda, "this torch has no CUDA: the index served a CPU build"
EOF
t_torch=$(( $(date +%s) - t0 ))

stamp "copy of the sources"
mkdir -p "$work/src"
git ls-files -z --cached --others --exclude-standard | (cd "$ROOT" && xargs -0 tar cf - --) \
  | tar xf - -C "$work/src"

export BPO_FAST_GIT_SHA="$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo -dirty)"
stamp "pip wheel (FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$ARCHS MAX_JOBS=$MAX_JOBS)"
mkdir -p "$OUT"
tb=$(date +%s)
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCHS" nice -n 10 \
  "${PIP[@]}" wheel --no-build-isolation --no-deps -q -w "$work/wheels" "$work/src"
t_build=$(( $(date +%s) - tb ))
whl=$(ls "$work"/wheels/bpo_fast-*.whl)
cp "$whl" "$OUT/"
whl="$OUT/$(basename "$whl")"

stamp "cuobjdump: archs in _C.so"
mkdir -p "$work/unz"
(cd "$work/unz" && unzip -q "$whl")
so=$(ls "$work"/unz/bpo_fast/_C*.so)
# cuobjdump: PATH, the toolkit the wheel was built with, else the copy Triton ships
home=$("$VPY" -c "import json,sys; print(json.load(open(sys.argv[1]))['cuda_home'])" \
       "$work/unz/bpo_fast/_build_info.json")
CUOBJDUMP=$(command -v cuobjdump || true)
for c in "$home/bin/cuobjdump" \
         "$("$PY" -c 'import os, triton; print(os.path.dirname(triton.__file__))' 2>/dev/null \
            )/backends/nvidia/bin/cuobjdump"; do
  if [ -z "$CUOBJDUMP" ] && [ -x "$c" ]; then CUOBJDUMP=$c; fi
done
[ -n "$CUOBJDUMP" ] || { echo "no cuobjdump found (PATH, $home/bin, triton)" >&2; exit 1; }
echo "  cuobjdump: $CUOBJDUMP"
elf=$("$CUOBJDUMP" --list-elf "$so")
ptx=$("$CUOBJDUMP" --list-ptx "$so")
echo "$elf" | sed 's/^/  /'
echo "$ptx" | sed 's/^/  /'
fail=0
for a in sm_80 sm_90; do
  echo "$elf" | grep -q "\.$a\." || { echo "missing SASS for $a" >&2; fail=1; }
done
echo "$ptx" | grep -q "\.sm_90\." || { echo "missing PTX for sm_90" >&2; fail=1; }
[ $fail = 0 ] || exit 1
debug_sections=$(readelf -S "$so" | grep -c '\.debug_' || true)

stamp "install the wheel, import it on the CPU, CPU noise tests against it"
"${PIP[@]}" install -q --no-deps "$whl"
mkdir -p "$work/t"
cp "$ROOT/tests/conftest.py" "$ROOT/tests/test_noise.py" "$work/t/"
printf '[pytest]\nmarkers =\n    cuda: needs a CUDA GPU\n    slow: long-running test\n' \
  > "$work/t/pytest.ini"
(cd "$work/t" && env -u PYTHONPATH "$VPY" - <<'EOF'
import json, bpo_fast, torch
info = bpo_fast.extension_info()
print(json.dumps(info))
assert bpo_fast.__file__.find("site-packages") > 0, bpo_fast.__file__
assert info["available"] and info["cuda"], info
assert torch._C._dispatch_has_kernel_for_dispatch_key("bpo_fast::diffusion_noise", "CUDA")
EOF
)
(cd "$work/t" && env -u PYTHONPATH "$VPY" -m pytest -q -p no:cacheprovider --rootdir . \
  test_noise.py -k "not cuda")

echo
echo "== summary"
echo "wheel:        $whl ($(du -h "$whl" | cut -f1))"
echo "_C.so:        $(du -h "$so" | cut -f1), ${debug_sections} .debug_* sections"
echo "SASS:         $(echo "$elf" | grep -o 'sm_[0-9]*' | sort -u | tr '\n' ' ')"
echo "PTX:          $(echo "$ptx" | grep -o 'sm_[0-9]*' | sort -u | tr '\n' ' ')"
echo "times:        venv+torch ${t_torch}s, build ${t_build}s, total $(( $(date +%s) - t0 ))s"
