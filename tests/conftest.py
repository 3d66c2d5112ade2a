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
