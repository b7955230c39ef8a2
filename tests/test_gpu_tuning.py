"""The tuner's timer on a CUDA GPU (`pytest -m gpu`): its CUDA-graph replay time per launch agrees
with Triton's `do_bench_cudagraph` on kernels of a few microseconds to a millisecond, and ranks
two kernels of different cost the same way."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("n", [256, 2048, 8192])
def test_replay_timer_agrees_with_triton(n):
    from triton.testing import do_bench_cudagraph

    from lowbit_compile.kernels import tuning

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(a)

    def launch():
        torch.mm(a, a, out=out)

    launch()
    ours = tuning._replay_ms(launch, tuning.FINAL_REP_MS)
    theirs = do_bench_cudagraph(launch, rep=20, return_mode="median")
    assert 0.8 < ours / theirs < 1.25, (ours, theirs)
    small = torch.randn(n // 2, n, device="cuda", dtype=torch.bfloat16)
    half = torch.empty(n // 2, n, device="cuda", dtype=torch.bfloat16)
    if n >= 2048:  # large enough that half the rows take clearly less time
        assert tuning._replay_ms(lambda: torch.mm(small, a, out=half), tuning.FINAL_REP_MS) < ours
