"""Test setup: run Triton kernels under the interpreter on CPU-only machines.

TRITON_INTERPRET must be set before triton is imported, hence here, at collection time.
Tests that need a GPU carry ``@pytest.mark.cuda`` and are skipped without one.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # one line instead of an InterpreterError in every kernel test
    if os.environ.get("TRITON_INTERPRET") == "1":
        from bpo_fast.versions import interpreter_problem

        problem = interpreter_problem()
        if problem:
            pytest.exit(problem, returncode=4)


def _paligemma2_refused():
    """Why PaliGemma 2 tests cannot run here (transformers below its floor), or None."""
    from packaging.version import Version

    from bpo_fast.versions import PALIGEMMA2_TRANSFORMERS, installed

    have = installed("transformers")
    if have and Version(have) < Version(PALIGEMMA2_TRANSFORMERS):
        return (f"transformers {have} < {PALIGEMMA2_TRANSFORMERS}: PaliGemma 2 is refused here "
                "(tests/test_versions.py checks the refusal)")
    return None


def pytest_collection_modifyitems(config, items):
    pali2 = _paligemma2_refused()
    for item in items:
        if pali2 and "paligemma2" in item.name and "refused" not in item.name:
            item.add_marker(pytest.mark.skip(reason=pali2))
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A tiny random LLaVA (model + processor) saved to disk once per test session."""
    from bpo_fast.models.tiny import build_tiny_llava

    path = tmp_path_factory.mktemp("tiny_llava")
    build_tiny_llava(str(path), seed=0)
    return str(path)


@pytest.fixture(params=["reference", "kernel"])
def loss_path(request, monkeypatch):
    """The [B]-sized preference loss on its torch reference (autograd) or on the Triton pair
    kernel (interpreter on CPU): the two CPU paths the loss tests run on."""
    if request.param == "kernel" and not (os.environ.get("TRITON_INTERPRET") == "1" or HAS_CUDA):
        pytest.skip("needs TRITON_INTERPRET=1 or CUDA")
    if request.param == "reference":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return request.param
