"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters


@pytest.fixture
def fresh_dynamo():
    """Every test compiles its own models: no cache entries, recompile budget or counters carried over."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
