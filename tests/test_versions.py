"""Version floors: pyproject.toml states what bpo_fast.versions checks, and a library below its
floor stops the model layer in one line (exit 2 from the CLI) instead of running without images.

The floor environment of .ci/run runs this file with the oldest supported versions (transformers
at its floor, below PaliGemma 2's), and then once more with transformers below the floor.
"""

import os
import re
import subprocess
import sys

import pytest
from packaging.version import Version

from bpo_fast import versions
from bpo_fast.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _floors():
    """``{name: floor}`` of every ``name>=floor`` requirement in pyproject.toml (the project's
    dependencies and every extra)."""
    text = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    body = text.split("[project]", 1)[1].split("[project.scripts]", 1)[0]
    out = {}
    for name, floor in re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9.]*)', body):
        out.setdefault(name.lower(), floor)
    return out


def test_pyproject_states_the_floors_the_code_checks():
    floors = _floors()
    assert floors["transformers"] == versions.TRANSFORMERS
    assert floors["triton"] == "3.6"  # the oldest Triton the gate compiles every kernel for
    from bpo_fast.tools.gpu_check import OLDEST_TRITON

    assert OLDEST_TRITON.startswith(floors["triton"])


def _fake_dist(tmp_path, name, version):
    """A folder that, first on sys.path, makes ``name`` look installed at ``version`` to
    ``importlib.metadata`` (metadata only: importing ``name`` still finds the real one)."""
    site = tmp_path / f"fake-{name}-{version}"
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return str(site)


def _below_floor():
    major, minor, patch = (int(x) for x in versions.TRANSFORMERS.split("."))
    return f"{major}.{minor - 1}.0" if minor else f"{major - 1}.99.0"


def test_require_names_installed_and_needed_versions(monkeypatch):
    monkeypatch.setattr(versions, "installed", lambda dist: "5.17.0")
    with pytest.raises(UserError) as e:
        versions.require("transformers", "5.18.0", "the model layer")
    msg = str(e.value)
    assert "\n" not in msg
    assert "transformers 5.17.0 is installed" in msg and "transformers >= 5.18.0" in msg
    monkeypatch.setattr(versions, "installed", lambda dist: None)
    with pytest.raises(UserError, match="transformers is not installed"):
        versions.require("transformers", "5.18.0", "the model layer")
    monkeypatch.setattr(versions, "installed", lambda dist: "5.18.0.dev0")
    with pytest.raises(UserError):  # a pre-release of the floor is below it
        versions.require("transformers", "5.18.0", "the model layer")
    monkeypatch.setattr(versions, "installed", lambda dist: "5.18.0")
    assert versions.require("transformers", "5.18.0", "the model layer") == "5.18.0"


def _ref_logps_argv(tmp_path, model_dir):
    from bpo_fast.train.synthetic import make_pairs

    pairs = make_pairs(str(tmp_path / "pairs"), n=2, seed=0)
    return [sys.executable, "-m", "bpo_fast.cli", "ref-logps", "--model", model_dir, "--data",
            pairs, "--image-root", str(tmp_path / "pairs"), "--out",
            str(tmp_path / "ref.safetensors"), "--device", "cpu", "--no-progress"]


def test_below_the_floor_the_model_layer_stops_in_one_line(tmp_path):
    """With transformers below the floor first on sys.path: importing bpo_fast.models raises the
    one-line UserError, and a command that loads a model exits 2 with that line, before any
    model is read (the model folder is empty)."""
    old = _below_floor()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [_fake_dist(tmp_path, "transformers", old), os.environ.get("PYTHONPATH", "")]))
    probe = subprocess.run([sys.executable, "-c", "import bpo_fast.models"], cwd=str(tmp_path),
                           env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 1
    assert f"UserError: transformers {old} is installed" in probe.stderr.strip().splitlines()[-1]
    (tmp_path / "model").mkdir()
    proc = subprocess.run(_ref_logps_argv(tmp_path, str(tmp_path / "model")), cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(err) == 1, err
    assert err[0] == (f"bpo-fast ref-logps: error: transformers {old} is installed; bpo-fast's "
                      "model layer (VLM forwards with precomputed image features, "
                      f"mm_encoder_outputs) needs transformers >= {versions.TRANSFORMERS} "
                      f"(pip install 'transformers>={versions.TRANSFORMERS}')")
    assert not (tmp_path / "ref.safetensors").exists()


def _paligemma2(tmp_path_factory):
    from bpo_fast.models.tiny_vlm import build_tiny_vlm

    path = str(tmp_path_factory.mktemp("paligemma2"))
    model, _ = build_tiny_vlm("paligemma2", path, seed=0)
    return model, path


def test_paligemma2_below_its_floor_is_refused_by_its_adapter(tmp_path_factory, monkeypatch):
    """PaliGemma 2 below PALIGEMMA2_TRANSFORMERS: one line, from get_adapter(model) (so
    PreferenceModel) and from load_vlm before the weights are read; PaliGemma 1 is not refused."""
    from bpo_fast.models.preference import load_vlm
    from bpo_fast.models.tiny_vlm import build_tiny_vlm
    from bpo_fast.models.vlm import get_adapter

    model, path = _paligemma2(tmp_path_factory)
    if Version(versions.installed("transformers")) >= Version(versions.PALIGEMMA2_TRANSFORMERS):
        monkeypatch.setattr(versions, "installed", lambda dist: "5.20.0")
    # else: the real thing (the floor environment of .ci/run)
    old = versions.installed("transformers")
    with pytest.raises(UserError) as e:
        get_adapter(model)
    msg = str(e.value)
    assert "\n" not in msg and "PaliGemma 2" in msg
    assert f"transformers {old} is installed" in msg
    assert f"transformers >= {versions.PALIGEMMA2_TRANSFORMERS}" in msg
    with pytest.raises(UserError, match=f"model {re.escape(repr(path))}: PaliGemma 2"):
        load_vlm(path)
    pali1, _ = build_tiny_vlm("paligemma", None, seed=0)
    assert get_adapter(pali1).name == "paligemma"


def test_the_triton_interpreter_check_names_the_numpy_that_breaks_triton_3_6():
    problem = versions.interpreter_problem("3.6.0", "2.4.6")
    assert "Triton 3.6.0" in problem and "numpy 2.4.6" in problem and "numpy<2.4" in problem
    assert "\n" not in problem
    assert versions.interpreter_problem("3.6.0", "2.3.5") is None
    assert versions.interpreter_problem("3.7.1", "2.4.6") is None
    assert versions.interpreter_problem("3.9.0", "2.5.0") is None


def test_the_test_suite_stops_in_one_line_on_a_broken_interpreter(tmp_path):
    """Triton 3.6 (as gpu_check installs it, first on PYTHONPATH) with numpy >= 2.4: pytest
    stops before any test with the reason; with a working pair it would run the kernel test."""
    if Version(versions.installed("numpy")) < Version("2.4"):
        pytest.skip("numpy < 2.4 here: Triton 3.6's interpreter works with it")
    from bpo_fast.tools.gpu_check import OLDEST_TRITON, ensure_triton

    site = ensure_triton(OLDEST_TRITON, None)  # the gate's copy (installed once, cached)
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([site, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.join(ROOT, "tests", "test_logprobs.py"), "-k", "kernels_match"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 4, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"Triton {OLDEST_TRITON}'s CPU interpreter" in proc.stdout + proc.stderr
    assert "InterpreterError" not in proc.stdout + proc.stderr
