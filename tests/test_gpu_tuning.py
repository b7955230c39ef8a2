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


def test_weight_only_plan_tuned_with_threads_runs_correctly(tmp_path, monkeypatch):
    """A cold tuning of every M bucket of one int4 weight (candidates compiled 8 at once, timed
    by replay), stored on disk; the tuned plan's launches match the reference op at odd M."""
    from torch._dynamo.utils import counters

    from lowbit_compile import ops, reference
    from lowbit_compile.formats import get_format
    from lowbit_compile.kernels import tuning, weight_only
    from lowbit_compile.report import sqnr

    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LOWBIT_AUTOTUNE", "1")
    monkeypatch.setenv("LOWBIT_TUNING_THREADS", "8")
    monkeypatch.setattr(tuning, "_memory", {})
    counters.clear()
    torch.manual_seed(0)
    n, k = 328, 640  # a shape no other test tunes
    q = reference.quantize(torch.randn(n, k, device="cuda"), "int4_g128_asym")
    meta = weight_only.WeightMeta.of(get_format("int4_g128_asym"), q.data)
    flat = weight_only.plan(meta, torch.bfloat16, False, torch.device("cuda"))
    assert counters["lowbit"]["tuning_runs"] == len(weight_only.M_BUCKETS)
    assert (tmp_path / "tuning.json").exists()
    empty = torch.empty(0, device="cuda")
    for m in (1, 5, 77, 300, 1500):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        out = weight_only.run(x, q.data, q.scale, q.zero_point, None, "int4_g128_asym", torch.bfloat16, flat)
        expected = ops._weight_only_mm_reference(x, q.data, q.scale, q.zero_point, empty, None, "int4_g128_asym",
                                                 torch.float32)  # fmt: skip
        assert sqnr(expected, out.float()) >= 45


@pytest.mark.parametrize("family", ["scaled_mm_fp8", "scaled_mm_int8", "int4_scaled_mm"])
def test_scaled_families_tune_with_threads(tmp_path, monkeypatch, family):
    """The scaled-GEMM families' timed launches (`common.timed_launch`, shared operands per bucket)
    tune every bucket of one weight cold and give a plan of their own config type."""
    from torch._dynamo.utils import counters

    from lowbit_compile.kernels import common, int4_scaled_mm, scaled_mm, tuning

    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LOWBIT_AUTOTUNE", "1")
    monkeypatch.setattr(tuning, "_memory", {})
    counters.clear()
    device = torch.device("cuda")
    if family == "int4_scaled_mm":
        flat = int4_scaled_mm.plan(int4_scaled_mm.Int4ScaledMeta(328, 640, 128), torch.bfloat16, True, device)
        configs = int4_scaled_mm.unflatten_plan(flat)
    else:
        meta = scaled_mm.ScaledMeta(328, 640, family.endswith("int8"), False, False, False)
        flat = scaled_mm.plan(meta, torch.bfloat16, True, device)
        configs = scaled_mm.unflatten_plan(flat)
    assert counters["lowbit"]["tuning_runs"] == len(common.M_BUCKETS)
    assert counters["lowbit"]["tuning_build_seconds_x1000"] > 0
    assert [(first, last) for first, last, _ in configs] == [(f, l) for f, l, _ in common.M_BUCKETS]
