"""Shared fixtures."""

from __future__ import annotations

import os

import torch

# Without a GPU, our Triton kernels run in Triton's interpreter (it must be chosen before the
# kernels are defined, i.e. before lowbit_compile is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402


@pytest.fixture
def fresh_dynamo():
    """Every test compiles its own models: no cache entries, recompile budget or counters carried over."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
