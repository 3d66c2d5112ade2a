"""A CPU stand-in for the GPU machine's Python environment, for ``gpu_session.sh --dry-run``.

``python bench/device_venv.py`` builds (once; reused while its package list is unchanged) a venv
with the machine's documented packages (``bench/device-env.txt``) under
``~/.cache/bpo-fast/device-venv-<hash>`` (``$BPO_FAST_CACHE`` overrides the root) and prints its
path. Where it differs from the machine, and why:

- Python: this interpreter's (3.11 on the dev machines; the GPU machine has 3.12.3): the only
  torch wheel here that downloads no CUDA libraries is the local ``torch 2.13.0+cpu`` for 3.11.
  Fetch the carried wheels for it with ``PYTHON_VERSION=3.11`` (binary wheels are per Python).
- torch 2.13.0 CPU stands in for 2.11.0+cu130; no torchvision (0.26 pairs with torch 2.11; the
  model layer and the tiny test models run without it).
- numpy < 2.4: Triton 3.6's CPU interpreter (which the dry run uses for the kernels) breaks with
  numpy >= 2.4; the machine runs the kernels on the GPU.
- Packages whose version the machine does not document (peft, pyarrow, pandas, ...): the newest
  pip resolves with the rest (a machine with an older pyarrow gets the older carried datasets,
  or none and then no trl: tests/test_gpu_session.py shows that rule on wheels made up for it).
- No pytest: not documented on the machine, so the overlay has to bring it.
"""

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSTITUTES = {"torch": "torch==2.13.0", "torchvision": None, "numpy": "numpy<2.4"}


def requirements(device_file=os.path.join(ROOT, "bench", "device-env.txt")):
    out = []
    with open(device_file, encoding="utf-8") as f:
        for line in f:
            spec = line.split("#", 1)[0].strip()
            if not spec:
                continue
            name = spec.split("==")[0].strip().lower()
            if name in SUBSTITUTES:
                spec = SUBSTITUTES[name]
            if spec:
                out.append(spec)
    return out


def cache_root():
    return os.environ.get("BPO_FAST_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "bpo-fast"))


def python_version(python, digits=2):
    """``"3.11"``: the version of the interpreter ``python``."""
    out = subprocess.check_output(
        [python, "-c", "import platform; print(platform.python_version())"], text=True).strip()
    return ".".join(out.split(".")[:digits])


def build(python=sys.executable, quiet=True):
    """The venv's folder, built when missing (under a lock: concurrent callers wait)."""
    reqs = requirements()
    version = python_version(python, 3)
    key = hashlib.sha256("\n".join([version] + reqs).encode()).hexdigest()[:12]
    path = os.path.join(cache_root(), f"device-venv-{key}")
    done = os.path.join(path, ".complete")
    os.makedirs(cache_root(), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(done):
            shutil.rmtree(path, ignore_errors=True)   # an interrupted build
            subprocess.run([python, "-m", "venv", path], check=True)
            q = ["-q"] if quiet else []
            subprocess.run([os.path.join(path, "bin", "python"), "-m", "pip", "install", *q,
                            "--disable-pip-version-check", *reqs], check=True)
            with open(done, "w") as f:
                f.write("\n".join(reqs) + "\n")
    return path


if __name__ == "__main__":
    print(build(quiet="-v" not in sys.argv))
