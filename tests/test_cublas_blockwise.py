"""cuBLAS block-scaled GEMM paths (`kernels/cublas_blockwise.py`) on CPU: which calls take them, and
that the operands they hand to `F.scaled_mm` mean what the formats' reference means.

cuBLAS's block-scaled fp8 GEMM runs only on sm_90, so here `F.scaled_mm` is replaced by an emulator
that checks what torch checks (dtypes, shapes, strides of the scale tensors) and computes the
documented math in float64: out[m, n] = sum_g (x[m, g] . w[n, g]) * sa[m, g] * sb(n, g), with sb
read per 128x128 block or per 1x128 group. The GPU suite (`test_gpu_scaled_mm.py`,
`test_gpu_w4_auto.py`) runs the real thing."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from lowbit_compile import ops, reference
from lowbit_compile.formats import get_format
from lowbit_compile.kernels import cublas_blockwise
from lowbit_compile.kernels import int4_scaled_mm as int4
from lowbit_compile.kernels import scaled_mm as scaled
from lowbit_compile.report import sqnr

pytestmark = pytest.mark.skipif(not hasattr(F, "scaled_mm"), reason="F.scaled_mm is torch >= 2.10")

CUDA = torch.device("cuda")


def _emulated_scaled_mm(a, b, scale_a, recipe_a, scale_b, recipe_b, bias=None, output_dtype=torch.bfloat16):
    """The 1x128 x 128x128 and 1x128 x 1x128 recipes of `F.scaled_mm`, with torch's layout checks."""
    st = F.ScalingType
    assert bias is None or bias.dtype == output_dtype
    assert a.dtype == b.dtype == torch.float8_e4m3fn
    m, k = a.shape
    n = b.shape[1]
    groups = k // 128
    assert recipe_a == st.BlockWise1x128
    assert scale_a.shape == (m, groups) and scale_a.stride() == (1, m), (scale_a.shape, scale_a.stride())
    assert b.stride(0) == 1, "B must be column-major (W row-major, transposed)"
    if recipe_b == st.BlockWise128x128:
        padded = -(-groups // 4) * 4
        assert scale_b.shape == (padded, -(-n // 128)) and scale_b.stride() == (1, padded)
        sb = scale_b[:groups].t().repeat_interleave(128, 0)[:n]  # (N, groups)
    else:
        assert recipe_b == st.BlockWise1x128
        assert scale_b.shape == (n, groups) and scale_b.stride() == (1, n)
        sb = scale_b
    products = torch.einsum("mgk,ngk->mng", a.double().view(m, groups, 128), b.t().double().view(n, groups, 128))
    out = (products * scale_a.double()[:, None, :] * sb.double()[None, :, :]).sum(-1)
    if bias is not None:
        out += bias.double()
    return out.to(output_dtype)


@pytest.fixture
def emulated_cublas(monkeypatch):
    """The block-scaled paths taken on CPU tensors: `usable` says yes for M as on an sm_90 GPU, the
    GEMM is the emulator above, and calls are counted."""
    calls = []

    def usable(m, n, k, device):
        return isinstance(m, int) and m > 0 and m % 4 == 0 and n % 16 == 0 and k % 128 == 0

    def gemm(*args, **kwargs):
        calls.append(args[3])
        return _emulated_scaled_mm(*args, **kwargs)

    monkeypatch.setattr(cublas_blockwise, "usable", usable)
    monkeypatch.setattr(F, "scaled_mm", gemm)
    return calls


def test_scale_layouts_are_what_cublas_reads():
    scale = torch.rand(300, 3)
    mm = cublas_blockwise.m_major(scale)
    assert mm.shape == (300, 3) and mm.stride() == (1, 300) and torch.equal(mm, scale)
    blocks = torch.rand(5, 3)  # N/128 = 5 blocks of rows, K/128 = 3: padded to 4 columns
    wb = cublas_blockwise.weight_block_scales(blocks, 3 * 128)
    assert wb.shape == (4, 5) and wb.stride() == (1, 4)
    assert torch.equal(wb[:3], blocks.t()) and not wb[3].any()
    assert cublas_blockwise.weight_block_scales(torch.rand(2, 4), 512).shape == (4, 2)  # no padding needed


def test_usable_only_for_a_static_aligned_m_on_cuda():
    usable = cublas_blockwise.usable
    cpu = torch.device("cpu")
    assert not usable(256, 4096, 4096, cpu)
    for m, n, k in ((258, 4096, 4096), (256, 4104, 4096), (256, 4096, 4160), (0, 4096, 4096)):
        assert not usable(m, n, k, CUDA), (m, n, k)  # checked before any device query

    class Symbolic:  # a symbolic M (not an int): never
        pass

    assert not usable(Symbolic(), 4096, 4096, CUDA)


def test_which_calls_take_the_cublas_paths(emulated_cublas):
    block = scaled.ScaledMeta.of(get_format("fp8_e4m3_1x128"), get_format("fp8_e4m3_128x128"), torch.empty(256, 512))
    row = scaled.ScaledMeta.of(get_format("fp8_e4m3_row"), get_format("fp8_e4m3_row"), torch.empty(256, 512))
    first = scaled.CUBLAS_MIN_ROWS
    assert first == 129
    assert scaled.uses_cublas(block, 132, CUDA) and not scaled.uses_cublas(block, 128, CUDA)
    assert not scaled.uses_cublas(block, 130, CUDA)  # M not a multiple of 4
    assert not scaled.uses_cublas(row, 1024, CUDA)  # rowwise stays on the Triton kernel
    partial = scaled.ScaledMeta.of(get_format("fp8_e4m3_1x128"), get_format("fp8_e4m3_128x128"), torch.empty(272, 512))
    assert not scaled.uses_cublas(partial, 1024, CUDA)  # a partial last block of weight rows
    g128 = int4.Int4ScaledMeta.of(get_format("fp8_e4m3_row"), get_format("int4_g128"), torch.empty(256, 256))
    g64 = int4.Int4ScaledMeta.of(get_format("fp8_e4m3_row"), get_format("int4_g64"), torch.empty(256, 256))
    head = int4.Int4ScaledMeta.of(get_format("fp8_e4m3_row"), get_format("int4_g128"), torch.empty(128256, 2048))
    assert int4.uses_cublas(g128, 132, CUDA) and not int4.uses_cublas(g128, 128, CUDA)
    assert not int4.uses_cublas(g64, 1024, CUDA)  # cuBLAS's weight groups are 1x128
    assert not int4.uses_cublas(head, 1024, CUDA)  # an LM head's fp8 codes would be 0.5 GB per call


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])  # bf16: the bias in the epilogue
def test_fp8_block_path_matches_the_reference(emulated_cublas, bias, out_dtype):
    """`scaled_mm.run` at a static M of the compute-bound bucket hands cuBLAS operands whose
    product is the fp8-block reference (K / 128 = 3 groups: block scales padded to 4 columns)."""
    torch.manual_seed(0)
    m, n, k = 132, 256, 384
    x_fmt, w_fmt = "fp8_e4m3_1x128", "fp8_e4m3_128x128"
    x, w = torch.randn(2, m // 2, k), torch.randn(n, k)
    w[:, 5] *= 30  # an outlier channel: scales differ per block
    qx, qw = reference.quantize(x, x_fmt), reference.quantize(w, w_fmt)
    b = torch.randn(n) if bias else None
    out = scaled.run(qx.data, qx.scale, qw.data, qw.scale, b, x_fmt, w_fmt, out_dtype, flat_plan=[])
    empty = torch.empty(0)
    expected = ops._scaled_mm_reference(
        qx.data, qx.scale, empty, qw.data, qw.scale, empty, b, x_fmt, w_fmt, torch.float32
    )
    assert emulated_cublas == [F.ScalingType.BlockWise1x128]  # one GEMM, block-scaled
    assert out.shape == (2, m // 2, n) and out.dtype == out_dtype
    # the same math (float64 against the reference's fp32), or that and one rounding to bf16
    assert sqnr(expected, out.float()) > (100 if out_dtype == torch.float32 else 45)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the code conversion is a Triton kernel")
def test_int4_codes_to_fp8_is_exact():
    torch.manual_seed(1)
    for n, k in ((5, 384), (37, 256)):  # 960 and 4736 packed bytes: a partial last program
        q = reference.quantize(torch.randn(n, k), "int4_g128")
        fp8 = int4.codes_to_fp8(q.data)
        assert fp8.dtype == torch.float8_e4m3fn and fp8.shape == (n, k)
        codes = reference.unpack_4bit(q.data).float() - 8
        assert torch.equal(fp8.float(), codes)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the code conversion is a Triton kernel")
@pytest.mark.parametrize("bias", [False, True])
def test_w4_auto_path_matches_the_reference(emulated_cublas, bias):
    """`int4_scaled_mm.run` at a static M above the switch: the int4 codes as fp8, the group scales
    as 1x128 weight scales and the token's scale over every K group give the int4 x fp8 reference."""
    torch.manual_seed(2)
    m, n, k = 136, 48, 384
    x_fmt, w_fmt = "fp8_e4m3_row", "int4_g128"
    x, w = torch.randn(m, k), torch.randn(n, k)
    w[:, 3] *= 20
    qx, qw = reference.quantize(x, x_fmt), reference.quantize(w, w_fmt)
    b = torch.randn(n) if bias else None
    out = int4.run(qx.data, qx.scale, qw.data, qw.scale, b, x_fmt, w_fmt, torch.float32, flat_plan=[])
    empty = torch.empty(0)
    expected = ops._scaled_mm_reference(
        qx.data, qx.scale, empty, qw.data, qw.scale, empty, b, x_fmt, w_fmt, torch.float32
    )
    assert emulated_cublas == [F.ScalingType.BlockWise1x128]
    assert sqnr(expected, out) > 100
