"""GPU suite (`pytest -m gpu`) for `w4-auto`: the int4 x fp8 kernel (`kernels/int4_scaled_mm.py`) against
the reference at odd sizes with every candidate of the buckets it runs, and the recipe through
torch.compile: one graph for every M, the weight-only kernel below the switch, the int4 x fp8 kernel
at or above it, both in the output code and named by the report."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

from lowbit_compile import ops, reference
from lowbit_compile.formats import get_format
from lowbit_compile.policy import recipe
from lowbit_compile.report import sqnr
from lowbit_compile.testing import run_and_get_graphs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

X_FMT, W_FMT = "fp8_e4m3_row", "int4_g128"


@pytest.mark.parametrize("bucket_m", [16, 128, 4096])
def test_kernel_candidates_match_reference_at_odd_sizes(bucket_m):
    from lowbit_compile.kernels import int4_scaled_mm as int4

    n, k = 300, 640  # N not a multiple of any tile; K a multiple of the group but not of 256
    meta = int4.Int4ScaledMeta(n, k, 128)
    w = torch.randn(n, k, device="cuda")
    w[:, 130:256] = 0  # an all-zero group (scale 0) between others
    qw = reference.quantize(w, W_FMT)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    empty = torch.empty(0, device="cuda")
    for m in (1, 3, 17, 37, 300):
        x = torch.randn(m, k, device="cuda")
        x[0] = 0  # a padding row: zeros out
        qx = reference.quantize(x, X_FMT)
        expected = ops._scaled_mm_reference(
            qx.data, qx.scale, empty, qw.data, qw.scale, empty, bias, X_FMT, W_FMT, torch.float32
        )
        for config in int4._candidates(bucket_m, meta):
            out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
            int4.launch(qx.data, qx.scale, qw.data, qw.scale, bias, out, meta, config)
            assert sqnr(expected, out.float()) >= 45, (m, config)
            assert torch.equal(out[0].float(), bias.float()), (m, config)


def test_nan_propagates_as_in_eager():
    from lowbit_compile.kernels import int4_scaled_mm as int4

    x, w = torch.randn(5, 256, device="cuda"), torch.randn(48, 256, device="cuda")
    x[2, 7] = float("nan")
    w[9, 200] = float("nan")
    qx, qw = reference.quantize(x, X_FMT), reference.quantize(w, W_FMT)
    meta = int4.Int4ScaledMeta(48, 256, 128)
    empty = torch.empty(0, device="cuda")
    expected = ops._scaled_mm_reference(
        qx.data, qx.scale, empty, qw.data, qw.scale, empty, None, X_FMT, W_FMT, torch.float32
    )
    for config in (int4.Int4ScaledConfig(16, 64, 128, 4, 3), int4.Int4ScaledConfig(16, 64, 128, 4, 3, 2, 1)):
        out = torch.zeros(5, 48, device="cuda", dtype=torch.bfloat16)
        int4.launch(qx.data, qx.scale, qw.data, qw.scale, None, out, meta, config)
        assert torch.equal(out.isnan(), expected.isnan()) and out[2].isnan().all() and out[:, 9].isnan().all()


@pytest.mark.usefixtures("fresh_dynamo")
def test_dynamic_m_one_graph_both_kernels():
    from lowbit_compile.policy import W4_AUTO_SWITCH_M

    torch.manual_seed(3)
    layer = torch.nn.Linear(512, 320).to("cuda", torch.bfloat16).eval()
    w4_auto = recipe("w4-auto")  # rounded to nearest, so the test can fold the same weight itself
    policy = dataclasses.replace(w4_auto, default=dataclasses.replace(w4_auto.default, weight_search=False))
    compiled = torch.compile(layer, backend="lowbit", dynamic=True, options={"policy": policy})
    empty = torch.empty(0, device="cuda")
    folded = reference.quantize(layer.weight.detach(), W_FMT)
    with torch.no_grad():
        for m in (2, 7, 16, 17, W4_AUTO_SWITCH_M - 1, W4_AUTO_SWITCH_M, W4_AUTO_SWITCH_M + 1, 129, 700, 5, 2):
            x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
            out = compiled(x).float()
            if m < W4_AUTO_SWITCH_M:
                expected = ops._weight_only_mm_reference(
                    x, folded.data, folded.scale, empty, empty, layer.bias, W_FMT, torch.float32
                )
            else:
                qx = reference.quantize(x, X_FMT)
                expected = ops._scaled_mm_reference(
                    qx.data, qx.scale, empty, folded.data, folded.scale, empty, layer.bias, X_FMT, W_FMT, torch.float32
                )
            assert sqnr(expected, out) >= 40, m
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.usefixtures("fresh_dynamo")
def test_output_code_and_report_name_both_kernels():
    """Under a dynamic M both families' kernels are in the output code; the report names both and
    that the int4 x fp8 one is slower than bf16."""
    from lowbit_compile.policy import W4_AUTO_SWITCH_M

    layer = torch.nn.Linear(512, 320).to("cuda", torch.bfloat16).eval()
    x = torch.randn(3, 40, 512, device="cuda", dtype=torch.bfloat16)
    # dynamic: with a static M the op body drops the launches of buckets statically known to be
    # empty (common.active_buckets), so only one family's kernel would be in the code
    _, graphs = run_and_get_graphs(layer, x, policy="w4-auto", dynamic=True)
    code = graphs["output_code"]
    assert "def int4_scaled_mm_kernel(" in code and "def weight_only_kernel(" in code
    assert "torch.ops.lowbit.auto_mm.default(" not in code
    slower = ops.SLOWER_THAN_BF16["triton:int4_fp8"]
    expected = f"auto_mm [triton:w4a16 below M={W4_AUTO_SWITCH_M}, triton:int4_fp8 above; triton:int4_fp8: {slower}]"
    assert expected in graphs["report"]
    assert get_format(W_FMT).symmetric
