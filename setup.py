"""Build of bpo-fast and its compiled extension ``bpo_fast._C``.

What gets built:
- ``BPO_FAST_SKIP_EXT=1``: a pure-Python package (the ops use their PyTorch fallbacks).
- a ``CUDAExtension`` (CPU + CUDA kernels) when torch has CUDA and a CUDA toolkit is found,
  or when ``FORCE_CUDA=1`` or ``TORCH_CUDA_ARCH_LIST`` is set (GPU-less build nodes making
  CUDA wheels). Default archs: 8.0 and 9.0 (+PTX); ``TORCH_CUDA_ARCH_LIST`` overrides.
- else a ``CppExtension`` with the CPU implementation only.
``MAX_JOBS`` bounds parallel compilation (honoured by torch's BuildExtension/ninja).

Build with ``pip install --no-build-isolation .`` (or ``pip wheel --no-build-isolation .``) so
the installed torch is used.
"""

import glob
import json
import os
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _git_sha():
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


def _extensions():
    if _truthy("BPO_FAST_SKIP_EXT"):
        _write_build_info({"built": False, "reason": "BPO_FAST_SKIP_EXT=1", "git": _git_sha()})
        return [], {}

    import torch
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))

    force_cuda = _truthy("FORCE_CUDA") or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    has_toolkit = cpp_extension.CUDA_HOME is not None
    # CUDA when torch is a CUDA build and a toolkit is there (no GPU needed to build), or when
    # asked for explicitly.
    use_cuda = bool(cu_sources) and has_toolkit and (force_cuda or torch.version.cuda is not None)
    if force_cuda and not has_toolkit:
        raise RuntimeError("FORCE_CUDA/TORCH_CUDA_ARCH_LIST is set but no CUDA toolkit was found "
                           "(set CUDA_HOME)")
    if use_cuda and torch.version.cuda is None:
        raise RuntimeError(
            "FORCE_CUDA/TORCH_CUDA_ARCH_LIST asks for a CUDA build, but the installed torch "
            f"({torch.__version__}) has no CUDA: install a CUDA build of torch to make CUDA wheels")

    # No -std flag: torch's BuildExtension adds the standard its headers need (C++20 for
    # torch >= 2.10, C++17 before), for both the host compiler and nvcc.
    cxx_flags = ["-O3"]
    if sys.platform != "win32":
        cxx_flags += ["-fopenmp"]
    link_args = ["-fopenmp"] if sys.platform != "win32" else []

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
                "nvcc": ["-O3", "-lineinfo"],
            },
            extra_link_args=link_args,
        )
        info = {"built": True, "cuda": True, "archs": archs, "torch": torch.__version__,
                "cuda_version": torch.version.cuda, "git": _git_sha()}
    else:
        ext = CppExtension(
            "bpo_fast._C",
            cpp_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_args,
        )
        info = {"built": True, "cuda": False, "archs": None, "torch": torch.__version__,
                "cuda_version": None, "git": _git_sha()}
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
