"""Build of bpo-fast and its compiled extension ``bpo_fast._C``.

What gets built:
- ``BPO_FAST_SKIP_EXT=1``: a pure-Python package (the ops use their PyTorch fallbacks).
- a ``CUDAExtension`` (CPU + CUDA kernels) when torch has CUDA and a CUDA toolkit is found,
  or when ``FORCE_CUDA=1`` or ``TORCH_CUDA_ARCH_LIST`` is set (GPU-less build nodes making
  CUDA wheels). Default archs: 8.0 and 9.0 (+PTX); ``TORCH_CUDA_ARCH_LIST`` overrides.
- else a ``CppExtension`` with the CPU implementation only.
``MAX_JOBS`` bounds parallel compilation (honoured by torch's BuildExtension/ninja).

``CUDA_HOME`` is taken from the environment, else from where ``nvcc`` really lives (an ``nvcc``
wrapper script on ``PATH`` outside the toolkit is followed via ``nvcc -dryrun``), and must hold
``libcudart``; a CUDA build stops at once with a one-line error otherwise (not after minutes of
compiling at link time). Release builds carry no host debug info (``-g0``, debug sections
stripped at link); ``BPO_FAST_DEBUG=1`` keeps ``-g``.

Build with ``pip install --no-build-isolation .`` (or ``pip wheel --no-build-isolation .``) so
the installed torch is used.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _git_sha():
    if os.environ.get("BPO_FAST_GIT_SHA"):  # builds from a copy of the tree (build_wheels.sh)
        return os.environ["BPO_FAST_GIT_SHA"]
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, stderr=subprocess.DEVNULL
        ).decode().strip()
    except Exception:
        return "unknown"


def _write_build_info(info):
    # Read by bpo_fast.extension_info(): what this install was built with.
    path = os.path.join(ROOT, "bpo_fast", "_build_info.json")
    with open(path + ".tmp", "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def _cudart_dirs(home):
    """The library folders of a CUDA root that hold libcudart (empty when none does)."""
    found = []
    for pattern in ("lib64/libcudart.so*", "lib/libcudart.so*", "targets/*/lib/libcudart.so*",
                    "lib/x64/cudart*.lib"):
        found += glob.glob(os.path.join(home, pattern))
    return sorted({os.path.dirname(f) for f in found})


def _nvcc_root(nvcc):
    """The toolkit root of an ``nvcc`` executable: nvcc's own report of its bin folder
    (``nvcc -dryrun`` prints ``_HERE_=<bin>``, which sees through wrapper scripts), else the
    parent of the bin folder of its resolved path."""
    try:
        out = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        m = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.M)
        if m:
            return os.path.dirname(os.path.realpath(m.group(1).strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _find_cuda_home():
    """(CUDA root or None, where it came from). ``CUDA_HOME``/``CUDA_PATH`` win; else the root
    of the ``nvcc`` on PATH (or /usr/local/cuda)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var], var
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        nvcc = "/usr/local/cuda/bin/nvcc"
    if nvcc is None:
        return None, None
    return _nvcc_root(nvcc), f"nvcc at {nvcc}"


def _fail(msg):
    # one line, no traceback: a configuration problem, not a bug
    sys.exit(f"error: {msg}")


def _extensions():
    if _truthy("BPO_FAST_SKIP_EXT"):
        _write_build_info({"built": False, "reason": "BPO_FAST_SKIP_EXT=1", "git": _git_sha()})
        return [], {}

    import torch

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))

    force_cuda = _truthy("FORCE_CUDA") or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    cuda_home, origin = _find_cuda_home()
    # CUDA when torch is a CUDA build and a toolkit is there (no GPU needed to build), or when
    # asked for explicitly.
    want_cuda = bool(cu_sources) and (force_cuda or (torch.version.cuda is not None
                                                     and cuda_home is not None))
    if want_cuda:
        if cuda_home is None:
            _fail("FORCE_CUDA/TORCH_CUDA_ARCH_LIST asks for a CUDA build but no nvcc was found: "
                  "set CUDA_HOME to the CUDA toolkit root")
        if not _cudart_dirs(cuda_home):
            _fail(f"CUDA_HOME={cuda_home} (from {origin}) holds no libcudart "
                  "(lib64/, lib/ or targets/*/lib/): set CUDA_HOME to the CUDA toolkit root")
        if torch.version.cuda is None:
            _fail("FORCE_CUDA/TORCH_CUDA_ARCH_LIST asks for a CUDA build, but the installed torch "
                  f"({torch.__version__}) has no CUDA: install a CUDA build of torch")
        # torch.utils.cpp_extension reads CUDA_HOME when imported (and guesses from PATH, which
        # a wrapper script fools): give it the root found above
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if want_cuda:
        cpp_extension.CUDA_HOME = cuda_home
    use_cuda = want_cuda

    # No -std flag: torch's BuildExtension adds the standard its headers need (C++20 for
    # torch >= 2.10, C++17 before), for both the host compiler and nvcc.
    debug = _truthy("BPO_FAST_DEBUG")
    cxx_flags = ["-O3"]
    link_args = []
    if sys.platform != "win32":
        cxx_flags += ["-fopenmp"]
        link_args += ["-fopenmp"]
        # Python's own CFLAGS carry -g (~9 MB of host debug info in a CUDA _C.so): a later -g0
        # wins; debug sections are also dropped at link (host objects nvcc compiled included)
        cxx_flags += ["-g"] if debug else ["-g0"]
        if not debug and sys.platform.startswith("linux"):
            link_args += ["-Wl,--strip-debug"]

    if use_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by BuildExtension for -gencode flags
        ext = CUDAExtension(
            "bpo_fast._C",
            cpp_sources + cu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("BPO_FAST_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                # No --use_fast_math: csrc/philox.h picks the fast intrinsics itself where the
                # accuracy allows (sincos, rsqrt) and keeps the rest IEEE, so CUDA and CPU noise
                # agree to float rounding.
                "nvcc": ["-O3", "-lineinfo"] + (["-g"] if debug else ["-Xcompiler", "-g0"]),
            },
            extra_link_args=link_args,
        )
        info = {"built": True, "cuda": True, "archs": archs, "torch": torch.__version__,
                "cuda_version": torch.version.cuda, "cuda_home": cuda_home, "debug": debug,
                "git": _git_sha()}
    else:
        ext = CppExtension(
            "bpo_fast._C",
            cpp_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_args,
        )
        info = {"built": True, "cuda": False, "archs": None, "torch": torch.__version__,
                "cuda_version": None, "debug": debug, "git": _git_sha()}
    _write_build_info(info)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=_ninja_available())}


def _ninja_available():
    try:
        subprocess.check_output(["ninja", "--version"], stderr=subprocess.DEVNULL)
        return True
    except Exception:
        return False


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["bpo_fast", "bpo_fast.*"]) + ["bpo_fast.kernels"],
    package_dir={"bpo_fast.kernels": "kernels"},
    package_data={"bpo_fast": ["_build_info.json", "py.typed", "resources/*"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
