"""The torch.ops.lowbit ops: registration (opcheck), fake shapes, and agreement with q/dq math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowbit_compile  # noqa: F401  (registers the ops)
from lowbit_compile import reference
from lowbit_compile.report import sqnr

ops = torch.ops.lowbit


def _quantized_weight(n: int, k: int, fmt: str) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    weight = torch.randn(n, k) * 0.05
    return weight, ops.quantize(weight, fmt)


@pytest.mark.parametrize("fmt", ["int8_row", "int4_g32", "int4_g128_asym", "fp8_e4m3_row", "nvfp4"])
@pytest.mark.parametrize("rows", [1, 7])
def test_weight_only_mm_matches_dequantized_linear(fmt: str, rows: int) -> None:
    torch.manual_seed(rows)
    weight, (data, scale, zero_point, global_scale) = _quantized_weight(48, 128, fmt)
    x = torch.randn(rows, 3, 128)
    bias = torch.randn(48)
    out = ops.weight_only_mm(x, data, scale, zero_point, global_scale, bias, fmt, x.dtype)
    expected = F.linear(x, reference.fake_quantize(weight, fmt), bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.shape == (rows, 3, 48)
    assert sqnr(F.linear(x, weight, bias), out) > 15  # it is quantized, but not garbage
    assert sqnr(F.linear(x, weight, bias), out) < 80  # and not a pass-through


@pytest.mark.parametrize(
    "x_fmt,w_fmt",
    [
        ("int8_row", "int8_row"),
        ("fp8_e4m3_row", "fp8_e4m3_row"),
        ("fp8_e4m3_1x128", "fp8_e4m3_128x128"),
        ("mxfp8", "mxfp8"),
        ("mxfp4", "mxfp4"),
        ("nvfp4", "nvfp4"),
    ],
)
def test_scaled_mm_matches_qdq(x_fmt: str, w_fmt: str) -> None:
    torch.manual_seed(0)
    weight, (w_data, w_scale, _, w_global) = _quantized_weight(40, 256, w_fmt)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    x_data, x_scale, _, x_global = ops.quantize(x, x_fmt)
    out = ops.scaled_mm(x_data, x_scale, x_global, w_data, w_scale, w_global, None, x_fmt, w_fmt, torch.bfloat16)
    expected = F.linear(reference.fake_quantize(x.float(), x_fmt), reference.fake_quantize(weight, w_fmt))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


def test_auto_mm_switches_on_rows() -> None:
    torch.manual_seed(0)
    weight, (data, scale, zero_point, global_scale) = _quantized_weight(32, 64, "int8_row")
    small, large = torch.randn(3, 64), torch.randn(300, 64)
    for x, activation_quantized in ((small, False), (large, True)):
        out = ops.auto_mm(x, data, scale, zero_point, global_scale, None, "int8_row", "int8_row", 128, torch.float32)
        x_used = reference.fake_quantize(x, "int8_row") if activation_quantized else x
        torch.testing.assert_close(out, F.linear(x_used, reference.fake_quantize(weight, "int8_row")))


@pytest.mark.parametrize("causal,gqa", [(True, False), (False, True)])
def test_attention_matches_sdpa_of_dequantized(causal: bool, gqa: bool) -> None:
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 32)
    k = torch.randn(2, 2 if gqa else 4, 9, 32)
    v = torch.randn_like(k)
    mask = None if causal else torch.randn(9, 9)
    parts = [ops.quantize(t, "fp8_e4m3_row")[:2] for t in (q, k, v)]
    out = ops.attention(*parts[0], *parts[1], *parts[2], mask, causal, None, gqa, "fp8_e4m3_row", torch.float32)
    fq = [reference.fake_quantize(t, "fp8_e4m3_row") for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*fq, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (
        20 < sqnr(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa), out) < 60
    )


def test_zero_rows_give_zeros_and_nan_propagates() -> None:
    weight, (data, scale, zero_point, global_scale) = _quantized_weight(16, 64, "int8_row")
    x = torch.randn(4, 64)
    x[1] = 0
    x[2, 5] = float("nan")
    x_data, x_scale, _, x_global = ops.quantize(x, "int8_row")
    out = ops.scaled_mm(
        x_data, x_scale, x_global, data, scale, global_scale, None, "int8_row", "int8_row", torch.float32
    )
    assert torch.equal(out[1], torch.zeros(16))
    assert torch.isnan(out[2]).all()
    assert torch.isfinite(out[[0, 3]]).all()


def test_opcheck_fused_ops() -> None:
    """torch.library.opcheck: schema, fake impl and dispatch are consistent."""
    torch.manual_seed(0)
    _, (data, scale, zero_point, global_scale) = _quantized_weight(24, 64, "int4_g32_asym")
    x = torch.randn(3, 64)
    torch.library.opcheck(
        ops.weight_only_mm, (x, data, scale, zero_point, global_scale, None, "int4_g32_asym", torch.bfloat16)
    )
    _, (w_data, w_scale, _, w_global) = _quantized_weight(24, 64, "fp8_e4m3_row")
    x_data, x_scale, _, x_global = ops.quantize(x, "fp8_e4m3_row")
    # SchemaCheckMode itself multiplies inputs, which CPU float8 does not support: skip only that check.
    torch.library.opcheck(
        ops.scaled_mm,
        (
            x_data,
            x_scale,
            x_global,
            w_data,
            w_scale,
            w_global,
            torch.randn(24),
            "fp8_e4m3_row",
            "fp8_e4m3_row",
            torch.float32,
        ),
        test_utils=("test_faketensor", "test_aot_dispatch_dynamic"),
    )
    q = ops.quantize(torch.randn(1, 2, 5, 32), "int8_row")[:2]
    torch.library.opcheck(ops.attention, (*q, *q, *q, None, True, None, False, "int8_row", torch.float32))


def test_quantize_decomposes_to_aten_under_tracing() -> None:
    """Activation quantization must be plain aten math in the traced graph, so Inductor can fuse it."""
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = make_fx(lambda x: ops.quantize(x, "fp8_e4m3_row"))(torch.randn(4, 64)).graph
    targets = {str(n.target) for n in graph.nodes if n.op == "call_function"}
    assert not any("lowbit" in t for t in targets), targets
    assert any("amax" in t or "max" in t for t in targets), targets


# Issue 7: every lowbit op returns what its fake impl says (sizes and strides), with operands shaped
# as real models produce them: heads transposed out of (B, L, H, D), GQA, float and bool masks,
# activations that are views.
def _heads(batch: int, length: int, heads: int, dim: int) -> torch.Tensor:
    return torch.randn(batch, length, heads, dim).transpose(1, 2)  # (B, H, L, D), not contiguous


@pytest.mark.parametrize("fmt", ["int8_row", "fp8_e4m3_row"])
@pytest.mark.parametrize(
    "case",
    ["transposed", "gqa", "float_mask", "bool_mask", "decode"],
)
def test_opcheck_attention_with_model_shaped_inputs(fmt, case) -> None:
    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 4, 4, 7, 32
    if case == "gqa":
        kv_heads = 2
    q_len = 1 if case == "decode" else length
    q = ops.quantize(_heads(batch, q_len, heads, dim), fmt)[:2]
    k = ops.quantize(_heads(batch, length, kv_heads, dim), fmt)[:2]
    v = ops.quantize(_heads(batch, length, kv_heads, dim), fmt)[:2]
    mask = None
    if case == "float_mask":
        mask = torch.randn(batch, 1, q_len, length)
    elif case == "bool_mask":
        mask = torch.rand(batch, 1, q_len, length) > 0.3
        mask[..., 0] = True
    causal = case in ("transposed", "gqa")
    args = (*q, *k, *v, mask, causal, None, case == "gqa", fmt, torch.bfloat16)
    out = ops.attention(*args)
    assert out.is_contiguous()
    # CPU float8 tensors cannot go through SchemaCheckMode's input arithmetic: that check is skipped for fp8.
    utils = ("test_faketensor", "test_aot_dispatch_dynamic") if fmt.startswith("fp8") else None
    torch.library.opcheck(ops.attention, args, **({"test_utils": utils} if utils else {}))


@pytest.mark.parametrize("fmt", ["attn_fp8_t64", "attn_int8_t128"])
@pytest.mark.parametrize("case", ["transposed", "gqa", "float_mask", "bool_mask", "decode"])
def test_opcheck_block_attention_with_model_shaped_inputs(fmt, case) -> None:
    """The op that quantizes high-precision q, k, v itself (attention formats, issue 7)."""
    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 4, 2 if case == "gqa" else 4, 7, 32
    q_len = 1 if case == "decode" else length
    q = _heads(batch, q_len, heads, dim)
    k, v = _heads(batch, length, kv_heads, dim), _heads(batch, length, kv_heads, dim)
    mask = None
    if case == "float_mask":
        mask = torch.randn(batch, 1, q_len, length)
    elif case == "bool_mask":
        mask = torch.rand(q_len, length) > 0.3
    args = (q, k, v, mask, case in ("transposed", "gqa"), None, case == "gqa", fmt, torch.bfloat16)
    out = ops.block_attention(*args)
    assert out.is_contiguous() and out.dtype == torch.bfloat16 and out.shape == (batch, heads, q_len, dim)
    torch.library.opcheck(ops.block_attention, args)


@pytest.mark.parametrize("fmt", ["int4_g32_asym", "int8_row"])
def test_opcheck_linear_ops_with_view_activations(fmt) -> None:
    torch.manual_seed(0)
    _, (data, scale, zero_point, global_scale) = _quantized_weight(24, 64, fmt)
    x = torch.randn(5, 3, 64).transpose(0, 1)  # (3, 5, 64), not contiguous
    args = (x, data, scale, zero_point, global_scale, torch.randn(24), fmt, torch.bfloat16)
    assert ops.weight_only_mm(*args).is_contiguous()
    torch.library.opcheck(ops.weight_only_mm, args)
    if fmt == "int8_row":
        x_data, x_scale, _, x_global = ops.quantize(x, "int8_row")
        scaled = (x_data, x_scale, x_global, data, scale, global_scale, None, "int8_row", "int8_row", torch.float32)
        assert ops.scaled_mm(*scaled).is_contiguous()
        torch.library.opcheck(ops.scaled_mm, scaled)
        auto = (x, data, scale, zero_point, global_scale, None, "int8_row", "int8_row", 4, torch.bfloat16)
        assert ops.auto_mm(*auto).is_contiguous()
        torch.library.opcheck(ops.auto_mm, auto)


def test_attention_is_contiguous_when_sdpa_returns_transposed_memory(monkeypatch) -> None:
    """On CUDA, SDPA's flash/efficient kernels return (B, H, L, D) with (B, L, H, D) memory; the op
    must still return the contiguous tensor its fake impl describes (issue 7's assert_size_stride)."""
    sdpa = F.scaled_dot_product_attention

    def like_cuda(*args, **kwargs):
        out = sdpa(*args, **kwargs)
        return out.transpose(1, 2).contiguous().transpose(1, 2)

    import lowbit_compile.ops as ops_module

    monkeypatch.setattr(ops_module.F, "scaled_dot_product_attention", like_cuda)
    q = ops.quantize(_heads(2, 7, 4, 32), "int8_row")[:2]
    args = (*q, *q, *q, None, True, None, False, "int8_row", torch.bfloat16)
    assert ops.attention(*args).is_contiguous()
    torch.library.opcheck(ops.attention, args)


def test_auto_mm_report_names_the_slower_than_bf16_half(monkeypatch) -> None:
    """`kernel_name` for `auto_mm` appends the SLOWER_THAN_BF16 note of either half (once per kernel),
    as it does for single-kernel ops; names only, so no GPU is needed."""
    from lowbit_compile import ops as lowbit_ops

    if not lowbit_ops.HAS_TRITON:
        pytest.skip("kernel names need triton")
    cuda, name = torch.device("cuda"), lowbit_ops.kernel_name
    plain = "auto_mm [triton:w8a16 below M=128, triton:int8 above]"
    assert name("auto_mm", torch.bfloat16, cuda, "int8_row", 128, "int8_row") == plain
    monkeypatch.setitem(lowbit_ops.SLOWER_THAN_BF16, "triton:w8a16", "low note")
    monkeypatch.setitem(lowbit_ops.SLOWER_THAN_BF16, "triton:int8", "high note")
    assert name("auto_mm", torch.bfloat16, cuda, "int8_row", 128, "int8_row") == (
        "auto_mm [triton:w8a16 below M=128, triton:int8 above; triton:w8a16: low note; triton:int8: high note]"
    )
    # the reference (no kernel, e.g. on CPU) carries no note
    assert name("auto_mm", torch.bfloat16, torch.device("cpu"), "int8_row", 128, "int8_row") == (
        "auto_mm [reference below M=128, reference above]"
    )
    # w4-auto: the int4 x fp8 half is in the table with its H100 figures
    w4 = name("auto_mm", torch.bfloat16, cuda, "int4_g128", 2048, "fp8_e4m3_row")
    assert w4.startswith("auto_mm [triton:w4a16 below M=2048, triton:int4_fp8 above; triton:int4_fp8: slower than bf16")
    assert "triton:w4a16:" not in w4
