"""Compiling with Inductor's FX-graph cache and AOTAutograd's cache on (tests of warm compiles).

The cache directories come from the environment (TORCHINDUCTOR_CACHE_DIR, ...): set them to a
test's tmp_path first."""

from __future__ import annotations

from typing import Any

import torch
from torch._dynamo.utils import counters


def compile_with_caches(fn: Any, *args: Any, backend: Any = "lowbit", options: dict | None = None) -> tuple[dict, Any]:
    """Compile `fn` on a fresh Dynamo with both caches on and call it once under no_grad:
    (AOTAutograd's cache counters for that compile, the result)."""
    torch._dynamo.reset()
    counters.clear()
    with (
        torch._inductor.config.patch(fx_graph_cache=True, fx_graph_remote_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=True),
        torch.no_grad(),
    ):
        out = torch.compile(fn, backend=backend, options=options)(*args)
    return dict(counters["aot_autograd"]), out
