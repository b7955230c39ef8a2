"""Helpers shared by the tile-config sweeps (`sweep_weight_only.py`, `sweep_scaled_mm.py`)."""

from __future__ import annotations

from pathlib import Path

import torch


def bench_rotating(fn_list) -> float:
    """Median ms per call by CUDA-graph replay, each replay calling the next of `fn_list` (launches
    over different weight copies, so no weight stays in L2 between calls)."""
    from triton.testing import do_bench_cudagraph

    state = {"i": 0}

    def step():
        state["i"] = (state["i"] + 1) % len(fn_list)
        fn_list[state["i"]]()

    fn_list[0]()
    torch.cuda.synchronize()
    return do_bench_cudagraph(step, rep=30)


def write_compiled_facts(kernel, path: Path) -> None:
    """Registers and spills of every compiled variant of a Triton kernel (its in-memory cache; the
    key holds the constexprs and launch options), one line each."""
    lines = []
    for cache in kernel.device_caches.values():
        for key, compiled in cache[0].items():
            lines.append(f"regs={getattr(compiled, 'n_regs', None)} spills={getattr(compiled, 'n_spills', None)} key={key}")
    path.write_text("\n".join(lines))
