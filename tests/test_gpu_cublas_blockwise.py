"""GPU suite for the cuBLAS block-scaled paths (`kernels/cublas_blockwise.py`, `pytest -m gpu`):
fp8-block and w4-auto at a static M of the compute-bound bucket against the formats' reference op
(odd N, K/128 not a multiple of 4, bias, a zero row, a NaN), and through torch.compile with a static
M: cuBLAS's GEMM in the output code instead of our Triton tiles."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from lowbit_compile import ops, reference
from lowbit_compile.formats import get_format
from lowbit_compile.kernels import cublas_blockwise
from lowbit_compile.kernels import int4_scaled_mm as int4
from lowbit_compile.kernels import scaled_mm as scaled
from lowbit_compile.policy import W4_AUTO_SWITCH_M, recipe
from lowbit_compile.report import sqnr
from lowbit_compile.testing import run_and_get_graphs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    # the hardware these paths exist for: other GPUs keep the Triton tiles (uses_cublas says no)
    pytest.mark.skipif(
        not torch.cuda.is_available() or not cublas_blockwise.available(torch.cuda.current_device()),
        reason="cuBLAS block-scaled fp8 GEMMs need sm_90 and CUDA >= 12.9",
    ),
]

K = 640  # K / 128 = 5 groups (128x128 block scales padded to 8)


def _reference(qx, qw, bias, x_fmt, w_fmt):
    empty = torch.empty(0, device="cuda")
    return ops._scaled_mm_reference(
        qx.data, qx.scale, empty, qw.data, qw.scale, empty, bias, x_fmt, w_fmt, torch.float32
    )


@pytest.mark.parametrize("m", [132, 300, 1024])
@pytest.mark.parametrize(
    "x_fmt, w_fmt, family, N",
    [
        ("fp8_e4m3_1x128", "fp8_e4m3_128x128", scaled, 384),  # whole 128-row blocks (scaled.uses_cublas)
        ("fp8_e4m3_row", "int4_g128", int4, 272),  # N a multiple of 16, not of 128
    ],
)
def test_static_m_matches_reference_zero_row_and_nan(m, x_fmt, w_fmt, family, N):  # noqa: N803
    torch.manual_seed(m)
    x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
    x[0] = 0
    x[5, 17] = float("nan")
    w = torch.randn(N, K, device="cuda")
    w[:, 3] *= 20  # an outlier channel
    qx, qw = reference.quantize(x, x_fmt), reference.quantize(w, w_fmt)
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    meta = family.ScaledMeta.of if family is scaled else family.Int4ScaledMeta.of
    assert family.uses_cublas(meta(get_format(x_fmt), get_format(w_fmt), qw.data), m, x.device)
    out = family.run(qx.data, qx.scale, qw.data, qw.scale, bias, x_fmt, w_fmt, torch.bfloat16, flat_plan=[])
    expected = _reference(qx, qw, bias, x_fmt, w_fmt)
    assert out.shape == (m, N) and out.dtype == torch.bfloat16
    assert torch.equal(out[0], bias)  # a zero row: the bias alone
    assert out[5].isnan().all()
    finite = ~expected.isnan().any(1)
    assert sqnr(expected[finite], out.float()[finite]) >= 45


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize(
    "policy, tokens, cublas_code, triton_tile",
    [
        ("fp8-block", 132, "", "scaled_mm_block_kernel"),
        ("w4-auto", W4_AUTO_SWITCH_M, "codes_to_fp8_kernel", "int4_scaled_mm_kernel"),  # at w4-auto's switch
    ],
)
def test_static_prefill_graph_runs_cublas(policy, tokens, cublas_code, triton_tile):
    """A static M (two sequences): the graph's GEMM is cuBLAS's block-scaled one (`_scaled_mm_v2`),
    our Triton tile is not in the code, and the output is the reference op's on the folded weight
    (rounded to nearest: no weight search, so the test folds the same weight itself)."""
    torch.manual_seed(4)
    layer = torch.nn.Linear(K, 384).to("cuda", torch.bfloat16).eval()
    x = torch.randn(2, tokens // 2, K, device="cuda", dtype=torch.bfloat16)
    rtn = recipe(policy)
    rtn = dataclasses.replace(rtn, default=dataclasses.replace(rtn.default, weight_search=False))
    out, graphs = run_and_get_graphs(layer, x, policy=rtn, dynamic=False)
    code = graphs["output_code"]
    assert "_scaled_mm_v2" in code, code[-3000:]
    assert f"def {triton_tile}(" not in code
    if cublas_code:
        assert f"def {cublas_code}(" in code
    x_fmt, w_fmt = rtn.default.activation, rtn.default.weight
    qx, qw = reference.quantize(x.reshape(tokens, K), x_fmt), reference.quantize(layer.weight.detach(), w_fmt)
    expected = _reference(qx, qw, layer.bias.detach(), x_fmt, w_fmt)
    assert sqnr(expected, out.reshape(tokens, -1).float()) >= 40
