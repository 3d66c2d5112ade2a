"""The build: what extension_info() reports, the registered ops, and a wheel that ships them."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

import bpo_fast
from bpo_fast import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_extension_info_reports_the_build():
    info = bpo_fast.extension_info()
    for key in ("available", "cuda", "archs", "built_with_torch", "cuda_version", "error", "ops"):
        assert key in info
    with open(os.path.join(os.path.dirname(_ext.__file__), "_build_info.json")) as f:
        built = json.load(f)
    if not built.get("built"):
        pytest.skip(f"installed without the extension: {built.get('reason')}")
    assert info["available"], info["error"]
    assert info["error"] is None
    assert info["ops"] == ["diffusion_noise"]
    assert info["built_with_torch"] == torch.__version__  # the ABI the .so was compiled against
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("bpo_fast::diffusion_noise", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("bpo_fast::diffusion_noise", "CPU")
    assert info["cuda"] == has_cuda_kernel == built["cuda"]
    if info["cuda"]:
        assert info["archs"] and info["cuda_version"] == torch.version.cuda
    else:
        assert info["archs"] is None
    schema = str(torch.ops.bpo_fast.diffusion_noise.default._schema)
    assert "Generator? generator" in schema and "int? seed" in schema
    assert torch.Tag.nondeterministic_seeded in torch.ops.bpo_fast.diffusion_noise.default.tags


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ninja") is None and shutil.which("c++") is None, reason="no compiler")
def test_wheel_contains_the_extension(tmp_path):
    """`pip wheel --no-build-isolation .` builds a wheel with bpo_fast/_C*.so and the kernels.

    Built from a copy of the sources so the working tree (and its editable install) is left
    alone. ~30 s for the CPU extension on 2 cores; a CUDA torch compiles the CUDA kernels too.
    """
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc", "_build_info.json")
    for d in ("csrc", "bpo_fast", "kernels"):
        # symlinks kept as links: bpo_fast/kernels -> ../kernels, as in a clone
        shutil.copytree(os.path.join(ROOT, d), src / d, ignore=ignore, symlinks=True)
    out = tmp_path / "wheels"
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    env.pop("BPO_FAST_SKIP_EXT", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
         str(out), str(src)],
        env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(out.glob("bpo_fast-*.whl"))
    assert len(wheels) == 1, os.listdir(out)
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert any(n.startswith("bpo_fast/_C") and n.endswith(".so") for n in names), names
    # the Triton kernels ship as bpo_fast.kernels, never as a top-level `kernels` (the name of
    # a Hugging Face distribution transformers imports)
    assert {"bpo_fast/kernels/linear.py", "bpo_fast/kernels/target.py"} <= set(names), names
    assert not any(n.startswith("kernels/") for n in names), names
    assert "bpo_fast/ops/noise.py" in names
    info = json.loads(zipfile.ZipFile(wheels[0]).read("bpo_fast/_build_info.json"))
    from torch.utils.cpp_extension import CUDA_HOME

    assert info["built"] is True
    assert info["cuda"] == (torch.version.cuda is not None and CUDA_HOME is not None)
    # release build: no host debug info (BPO_FAST_DEBUG=1 keeps it)
    assert info["debug"] is False
    so = [n for n in names if n.startswith("bpo_fast/_C") and n.endswith(".so")][0]
    (tmp_path / "C.so").write_bytes(zipfile.ZipFile(wheels[0]).read(so))
    if shutil.which("readelf"):
        sections = subprocess.run(["readelf", "-S", str(tmp_path / "C.so")], capture_output=True,
                                  text=True).stdout
        assert ".debug_info" not in sections


def _setup_helpers():
    """setup.py's functions, without running setup()."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        src = f.read().split("ext_modules, cmdclass = _extensions()")[0]
    g = {"__file__": os.path.join(ROOT, "setup.py"), "__name__": "setup_helpers"}
    exec(compile(src, "setup.py", "exec"), g)
    return g


def test_cuda_home_is_found_through_an_nvcc_wrapper(tmp_path, monkeypatch):
    """An nvcc wrapper script outside the toolkit (torch would guess CUDA_HOME=/usr/local):
    setup.py asks nvcc where it really lives and checks libcudart is there."""
    g = _setup_helpers()
    real = tmp_path / "cuda-13.0"
    (real / "bin").mkdir(parents=True)
    (real / "targets" / "x86_64-linux" / "lib").mkdir(parents=True)
    (real / "targets" / "x86_64-linux" / "lib" / "libcudart.so.13").write_text("")
    nvcc = real / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ _HERE_={real}/bin' >&2\n")
    nvcc.chmod(0o755)
    wrap = tmp_path / "usr" / "bin"
    wrap.mkdir(parents=True)
    (wrap / "nvcc").write_text(f'#!/bin/sh\nexec {nvcc} "$@"\n')
    (wrap / "nvcc").chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrap}:{os.environ['PATH']}")
    home, origin = g["_find_cuda_home"]()
    assert home == str(real) and str(wrap) in origin
    assert g["_cudart_dirs"](home) == [str(real / "targets" / "x86_64-linux" / "lib")]
    assert g["_cudart_dirs"](str(tmp_path / "usr")) == []


def test_a_cuda_home_without_libcudart_stops_the_build_in_one_line(tmp_path):
    env = dict(os.environ, FORCE_CUDA="1", CUDA_HOME=str(tmp_path))
    env.pop("BPO_FAST_SKIP_EXT", None)
    proc = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: CUDA_HOME=") and "libcudart" in err[0], err


_PROBE = """
import os, sys, importlib.util
import kernels
import bpo_fast.kernels.linear as ours
print(getattr(kernels, "__file__", None))
print(os.path.realpath(ours.__file__))
"""


@pytest.mark.parametrize("how", ["cwd", "pythonpath"])
def test_top_level_kernels_never_shadows_another_distribution(tmp_path, how):
    """Our kernels/ folder (no __init__.py: a namespace portion) loses to a regular package of
    the same name further down sys.path, from the repository root and with PYTHONPATH=<root>;
    bpo_fast.kernels is still our code."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("CUDAProperties = object\n")
    if how == "cwd":
        cwd, path = ROOT, str(site)
    else:
        cwd, path = str(tmp_path), os.pathsep.join([ROOT, str(site)])
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs, ours = proc.stdout.split()
    assert theirs == str(site / "kernels" / "__init__.py")
    assert ours == os.path.realpath(os.path.join(ROOT, "kernels", "linear.py"))


@pytest.mark.parametrize("how", ["cwd", "pythonpath"])
def test_transformers_imports_its_kernels_from_the_repository_root(tmp_path, how):
    """transformers >= 5.25 imports the Hugging Face `kernels` distribution at import time."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    code = ("from transformers import LlavaForConditionalGeneration\n"
            "import bpo_fast.kernels.linear as ours, os\n"
            "print(os.path.realpath(ours.__file__))")
    cwd = ROOT if how == "cwd" else str(tmp_path)
    env = dict(os.environ)
    if how == "pythonpath":
        env["PYTHONPATH"] = ROOT
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == os.path.realpath(os.path.join(ROOT, "kernels", "linear.py"))
