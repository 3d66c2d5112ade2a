"""The GPU session, proven without a GPU.

- The rule of what a session carries and installs (``bench/overlay.py``), on wheels made up for
  each case: nothing the machine has as new, the newest carried version whose needs are met,
  and whatever needs a left-out wheel left out too, each with its reason.
- ``bash bench/gpu_session.sh --dry-run quick`` in a device-like CPU venv
  (``bench/device_venv.py``: the machine's transformers 5.17.0, triton 3.6.0, ... torch 2.13.0
  CPU for 2.11+cu130, Python 3.11 for 3.12) overlaid by the wheels ``bench/fetch_wheels.sh``
  fetches: install, the GPU tests' collection, the CPU twins of the model-level GPU tests and the
  smoke benches pass; and without the overlay the project refuses to run a VLM, in one line.
"""

import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import overlay  # noqa: E402  (bench/overlay.py)


def make_wheel(folder, name, version, requires=(), size=0):
    path = os.path.join(folder, f"{name.replace('-', '_')}-{version}-py3-none-any.whl")
    meta = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"] +
                   [f"Requires-Dist: {r}\n" for r in requires])
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
        z.writestr("pad.bin", os.urandom(size))
    return path


@pytest.fixture
def wheels(tmp_path):
    d = str(tmp_path / "whl")
    os.makedirs(d)
    make_wheel(d, "transformers", "5.24.0", ["huggingface-hub<3.0,>=1.31.0", "numpy>=1.17"])
    make_wheel(d, "datasets", "5.2.0", ["pyarrow>=24.0.0", "dill<0.4.2", "fsspec<=2026.9.0"])
    make_wheel(d, "datasets", "5.0.1", ["pyarrow>=21.0.0", "dill<0.4.2", "fsspec<=2026.6.0"])
    make_wheel(d, "dill", "0.4.1")
    make_wheel(d, "trl", "1.16.0", ["datasets>=4.7.0", "transformers>=4.56.2",
                                    'tomli; python_version < "3.11"'])
    make_wheel(d, "pytest", "8.3.5", ["pluggy<2,>=1.5"])
    make_wheel(d, "pluggy", "1.6.0")
    make_wheel(d, "pytest-timeout", "2.4.0", ["pytest>=7.0.0"])
    return d


def _plan(folder, machine):
    from packaging.version import Version

    m = {k: (v if v == overlay.UNKNOWN else Version(v)) for k, v in machine.items()}
    chosen, decisions = overlay.plan(overlay.load_wheels(folder), m)
    return ({f"{w.name}=={w.version}" for w in chosen},
            {f"{w.name}=={w.version}": reason for w, action, reason in decisions
             if action == "skip"})


MACHINE = {"transformers": "5.17.0", "huggingface-hub": "1.33.0", "numpy": "2.3.5",
           "fsspec": "2026.1.0", "pyarrow": "24.0.0"}


def test_overlay_takes_only_what_the_machine_lacks_or_has_too_old(wheels):
    chosen, skipped = _plan(wheels, dict(MACHINE, pytest="9.0.0"))
    assert chosen == {"transformers==5.24.0", "datasets==5.2.0", "dill==0.4.1", "trl==1.16.0",
                      "pytest-timeout==2.4.0", "pluggy==1.6.0"}
    assert skipped["pytest==8.3.5"] == "the machine has 9.0.0"      # never shadowed
    assert skipped["datasets==5.0.1"].startswith("an alternative: 5.2.0")


def test_overlay_picks_the_datasets_an_old_pyarrow_allows(wheels):
    chosen, skipped = _plan(wheels, dict(MACHINE, pyarrow="21.0.0"))
    assert {"datasets==5.0.1", "trl==1.16.0", "pytest==8.3.5"} <= chosen
    assert skipped["datasets==5.2.0"] == "needs pyarrow>=24.0.0, the machine has 21.0.0"


def test_overlay_leaves_out_what_needs_a_left_out_wheel(wheels):
    chosen, skipped = _plan(wheels, dict(MACHINE, pyarrow="19.0.0"))
    assert not any(c.startswith(("datasets", "trl")) for c in chosen)
    assert "transformers==5.24.0" in chosen
    assert skipped["trl==1.16.0"] == "needs datasets>=4.7.0: neither on the machine nor carried"
    # a dependency too new for every carried version (fsspec): the same
    chosen, skipped = _plan(wheels, dict(MACHINE, fsspec="2026.12.0"))
    assert "trl==1.16.0" not in chosen and "fsspec" in skipped["datasets==5.2.0"]


def test_overlay_check_against_the_documented_machine(wheels, tmp_path, capsys):
    device = tmp_path / "device.txt"
    device.write_text("transformers==5.17.0\nhuggingface-hub==1.33.0\nnumpy\npyarrow\nfsspec\n"
                      "# comment\n")
    args = ["check", wheels, "--device", str(device), "--max-mib", "60"]
    assert overlay.main(args) == 0
    # something the machine has (an overlay copy would shadow its own)
    make_wheel(wheels, "pyarrow", "26.0.1")
    assert overlay.main(args) == 1
    assert "pyarrow 26.0.1 is carried but the machine has it" in capsys.readouterr().err
    os.remove(os.path.join(wheels, "pyarrow-26.0.1-py3-none-any.whl"))
    # a requirement neither on the machine nor carried
    os.remove(os.path.join(wheels, "dill-0.4.1-py3-none-any.whl"))
    assert overlay.main(args) == 1
    assert "needs dill<0.4.2: neither on the machine nor carried" in capsys.readouterr().err
    make_wheel(wheels, "dill", "0.4.1")
    # over the size limit
    make_wheel(wheels, "ballast", "1.0", size=2 << 20)
    assert overlay.main(args[:-1] + ["1"]) == 1
    assert "is over 1.0 MiB" in capsys.readouterr().err


def _copy_tracked(dst):
    files = subprocess.check_output(["git", "ls-files", "-z"], cwd=ROOT).decode().split("\0")
    for f in filter(None, files):
        src, out = os.path.join(ROOT, f), os.path.join(dst, f)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        if os.path.islink(src):
            os.symlink(os.readlink(src), out)
        elif os.path.isfile(src):
            shutil.copy2(src, out)


@pytest.mark.slow
def test_dry_run_in_a_device_like_venv(tmp_path):
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")) and \
            not os.path.isfile(os.path.join(ROOT, ".git")):
        pytest.skip("needs a git checkout (the dry run runs on a copy of the tracked files)")
    import device_venv  # bench/device_venv.py

    venv = device_venv.build()
    py = os.path.join(venv, "bin", "python")
    repo = tmp_path / "repo"
    _copy_tracked(str(repo))
    whl = tmp_path / "whl"
    env = dict(os.environ, PYTHON_VERSION=device_venv.python_version(py), WHEEL_DIR=str(whl))
    r = subprocess.run(["bash", "bench/fetch_wheels.sh"], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    logs = tmp_path / "logs"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=os.path.join(venv, "bin") + os.pathsep + env["PATH"], WHEEL_DIR=str(whl),
               LOG_DIR=str(logs), OVERLAY=str(tmp_path / "overlay"), OUT=str(tmp_path / "out"))
    r = subprocess.run(["bash", "bench/gpu_session.sh", "--dry-run", "quick"], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=1200)
    summary = (logs / "logs" / "summary.txt").read_text()
    assert r.returncode == 0, summary + r.stdout[-3000:] + r.stderr[-3000:]
    steps = dict(re.findall(r"^(\S+) +(ok|FAILED\S*|TIMEOUT|SKIPPED) ", summary, re.M))
    assert steps == dict.fromkeys(("overlay", "build", "ext", "gpu-tests", "cpu-twins",
                                   "bench-noise", "bench-logprobs", "bench-linear"), "ok"), summary
    after = next(line for line in summary.splitlines() if line.startswith("after the overlay"))
    assert "transformers 5.24.0" in after and "trl 1.16.0" in after, after
    collected = (logs / "logs" / "gpu-tests.log").read_text().strip().splitlines()[-1]
    assert re.search(r"\d+ skipped", collected) and "error" not in collected, collected
    assert (tmp_path / "out" / "logs" / "summary.txt").exists()   # what a device call returns


@pytest.mark.slow
def test_the_machines_own_transformers_refuses_vlm_runs(tmp_path):
    """The device-like venv without the overlay (transformers 5.17.0, whose base forwards
    swallow mm_encoder_outputs): a VLM command stops in one line naming the version, exit 2,
    and writes nothing."""
    import device_venv

    from test_vlm_train import write_pairs

    py = os.path.join(device_venv.build(), "bin", "python")
    data, model, out = tmp_path / "data", tmp_path / "model", tmp_path / "r.safetensors"
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PYTHONPATH"] = ROOT
    # The model is built here (bpo_fast.models refuses to import under 5.17.0 at all).
    from bpo_fast.models.tiny import build_tiny_llava
    build_tiny_llava(str(model), seed=0)
    pairs = write_pairs(str(data), n=2)
    r = subprocess.run([py, "-m", "bpo_fast.cli", "ref-logps", "--model", str(model), "--data",
                        pairs, "--image-root", str(data), "--out", str(out), "--device", "cpu",
                        "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in r.stderr.splitlines() if " error: " in line]
    assert r.returncode == 2 and len(errors) == 1, r.stderr
    assert errors[0].startswith("bpo-fast ref-logps: error: ") and "transformers 5.17.0" in \
        errors[0], errors
    assert "Traceback" not in r.stderr and not out.exists()
