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


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


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
