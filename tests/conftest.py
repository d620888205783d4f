"""Test setup: run Triton kernels in the interpreter when no CUDA device is present.

TRITON_INTERPRET must be set before triton is first imported, hence at conftest import time.
"""
import os

import pytest

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False

if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def gen():
    """A CPU torch.Generator with a fresh seed per test: fresh random inputs on every run."""
    return torch.Generator().manual_seed(torch.seed() % 2**31)
