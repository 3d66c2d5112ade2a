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
