"""Quantized flash-attention kernel (`kernels/attention.py`) in Triton's interpreter (CPU, CI):
fp8 and int8 attention formats against their reference (`reference.attention`, same format) and
against float64 SDPA; causal, float and bool masks, GQA, odd lengths, transposed (B, L, H, D)
inputs, decode with split KV; NaN and zero rows; the op body; the lowering hook on fake CUDA
tensors; the report's kernel names.

Sizes are tiny and most cases use 16-token blocks (test formats registered below), so a few tiles
cover every code path in the interpreter: each launch takes 0.5-3 s."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from lowbit_compile import formats, reference
from lowbit_compile.report import sqnr

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 before triton is imported"
)

from _attention_formats import FP8, INT8  # noqa: E402  (16-token test formats)

from lowbit_compile import ops  # noqa: E402
from lowbit_compile.kernels import attention as kernel  # noqa: E402

formats.register_format(formats.Format("int8_t32", "int8", "token_block", block_rows=32))
# Q blocks of 32 rows on 16-row K/V tiles: a tile holds two K/V block widths of queries.
INT8_Q32 = formats.register_attention_format(
    formats.AttentionFormat("test_attn_int8_q32", "int8_t32", "int8_t16", "fp8_e4m3_t16", smooth_k=False)
).name

formats.register_format(formats.Format("fp8_e4m3_t32", "fp8_e4m3", "token_block", block_rows=32))
# K/V blocks of 32 keys read as 16-key tiles (the small K/V tile configs over pre-quantized K/V).
FP8_KV32 = formats.register_attention_format(
    formats.AttentionFormat("test_attn_fp8_kv32", "fp8_e4m3_t16", "fp8_e4m3_t32", "fp8_e4m3_t32", smooth_k=True)
).name

KERNEL_VS_REFERENCE_DB = 40.0  # same format: differences are fp32 summation order and rare rounding flips
VS_EXACT_DB = {FP8_KV32: 22.0, FP8: 22.0, INT8: 25.0, INT8_Q32: 25.0, "attn_fp8_t64": 22.0, "attn_int8_t128": 25.0}


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def heads_last(batch: int, heads: int, length: int, dim: int, dtype=torch.float16) -> torch.Tensor:
    """(B, H, L, D) seen through a (B, L, H, D) tensor, as a model's projections give it (not contiguous)."""
    return torch.randn(batch, length, heads, dim, dtype=dtype).transpose(1, 2)


def launch(q, k, v, mask=None, causal=False, gqa=False, fmt=FP8, scale=None):
    out = kernel.run(q, k, v, mask, causal, scale, gqa, fmt, torch.float32, config=kernel.default_config(fmt))
    return out


def check(q, k, v, mask=None, causal=False, gqa=False, fmt=FP8, scale=None):
    out = launch(q, k, v, mask, causal, gqa, fmt, scale)
    expected = reference.attention(q, k, v, mask, causal, scale, gqa, fmt)
    exact_mask = mask if mask is None or mask.dtype == torch.bool else mask.double()
    exact = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=exact_mask, is_causal=causal, scale=scale, enable_gqa=gqa
    )
    assert out.shape == expected.shape and out.is_contiguous()
    assert torch.equal(out.isnan(), expected.isnan())
    assert sqnr(expected, out) >= KERNEL_VS_REFERENCE_DB, sqnr(expected, out)
    assert sqnr(exact.float(), out) >= VS_EXACT_DB[fmt], sqnr(exact.float(), out)
    return out


@pytest.mark.parametrize("fmt", [FP8, INT8])
@pytest.mark.parametrize("causal", [False, True])
def test_prefill_gqa_odd_lengths_transposed_inputs(fmt, causal):
    # L != S (causal is top-left aligned, as SDPA), neither a multiple of the 16-row tiles; 2 q heads per kv head.
    q, k, v = heads_last(2, 4, 37, 32), heads_last(2, 2, 45, 32), heads_last(2, 2, 45, 32)
    check(q, k, v, causal=causal, gqa=True, fmt=fmt)


@pytest.mark.parametrize("head_group", [2, 4, 7])
def test_causal_launch_order_in_head_groups_covers_every_block_once(monkeypatch, head_group):
    # B * H = 6 (batch, head) pairs, 4 Q blocks each: groups of 2 divide them, 4 leaves a group of 2
    # and 7 is wider than the launch; every (pair, Q block) must be computed once, at its own rows.
    monkeypatch.setattr(kernel, "CAUSAL_HEAD_GROUP", head_group)
    q, k, v = heads_last(2, 3, 50, 32), heads_last(2, 3, 50, 32), heads_last(2, 3, 50, 32)
    check(q, k, v, causal=True, fmt=FP8)


def test_query_tile_of_two_q_blocks_and_a_head_dim_to_pad():
    q, k, v = heads_last(1, 2, 40, 48), heads_last(1, 2, 33, 48), heads_last(1, 2, 33, 48)  # D=48 pads to 64
    check(q, k, v, causal=True, fmt=INT8_Q32)


@pytest.mark.parametrize("causal", [False, True])
def test_query_tile_half_a_q_block_reads_the_whole_block_for_its_scale(causal):
    # 16-row tiles of 32-row Q blocks (the small-tile configs): each program takes the amax of the
    # whole block, its sibling's rows included, so the codes are the reference's; NaN in the other
    # half of the block reaches this half's rows through the shared scale.
    q, k, v = heads_last(1, 2, 40, 32), heads_last(1, 2, 33, 32), heads_last(1, 2, 33, 32)
    q[0, 1, 20] *= 50  # the largest |q| of block 0 of head 1 lies in the other tile of the block
    config = {"BLOCK_M": 16, "num_warps": 4, "num_stages": 2}
    out = kernel.run(q, k, v, None, causal, None, False, INT8_Q32, torch.float32, config=config)
    expected = reference.attention(q, k, v, None, causal, None, False, INT8_Q32)
    assert sqnr(expected, out) >= KERNEL_VS_REFERENCE_DB, sqnr(expected, out)
    q[0, 0, 17] = float("nan")
    out = kernel.run(q, k, v, None, causal, None, False, INT8_Q32, torch.float32, config=config)
    assert out[0, 0, :32].isnan().all() and not out[0, 0, 32:].isnan().any()


@pytest.mark.parametrize("causal", [False, True])
def test_kv_tiles_half_a_scale_block(causal):
    # 16-key tiles over 32-key K/V blocks (one scale per block, read by both tiles), odd lengths,
    # GQA; the same codes as the reference's, which quantizes per 32-key block.
    q, k, v = heads_last(1, 4, 45, 32), heads_last(1, 2, 50, 32), heads_last(1, 2, 50, 32)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2}
    out = kernel.run(q, k, v, None, causal, None, True, FP8_KV32, torch.float32, config=config)
    expected = reference.attention(q, k, v, None, causal, None, True, FP8_KV32)
    assert sqnr(expected, out) >= KERNEL_VS_REFERENCE_DB, sqnr(expected, out)
    whole = kernel.run(q, k, v, None, causal, None, True, FP8_KV32, torch.float32, config={**config, "BLOCK_N": 32})
    assert sqnr(whole, out) >= KERNEL_VS_REFERENCE_DB


@pytest.mark.parametrize("fmt", ["attn_fp8_t64", "attn_int8_t128"])
def test_builtin_formats_head_dim_64_and_128(fmt):
    dim = 64 if fmt.endswith("64") else 128
    q, k, v = heads_last(1, 2, 70, dim), heads_last(1, 1, 131, dim), heads_last(1, 1, 131, dim)
    check(q, k, v, gqa=True, fmt=fmt)


def test_float_mask_broadcast_over_heads_with_causal():
    q, k, v = heads_last(2, 2, 21, 32), heads_last(2, 2, 21, 32), heads_last(2, 2, 21, 32)
    mask = torch.randn(2, 1, 21, 21, dtype=torch.float16)
    check(q, k, v, mask=mask, causal=True, fmt=INT8)


def test_bool_mask_and_rows_masked_entirely():
    q, k, v = heads_last(1, 2, 19, 32), heads_last(1, 2, 35, 32), heads_last(1, 2, 35, 32)
    mask = torch.rand(19, 35) > 0.3
    mask[4] = False  # a row that sees nothing: 0, as SDPA
    out = check(q, k, v, mask=mask, fmt=FP8)
    assert (out[:, :, 4] == 0).all()
    fill = torch.zeros(19, 35).masked_fill(~mask, torch.finfo(torch.float32).min)  # eager-style finite fill
    out = launch(q, k, v, mask=fill, fmt=FP8)
    average = reference.attention(q, k, v, fill, False, None, False, FP8)
    assert torch.isfinite(out).all() and sqnr(average, out) >= KERNEL_VS_REFERENCE_DB  # row 4: average of all V


@pytest.mark.parametrize("fmt", [FP8, INT8])
@pytest.mark.parametrize("query_len", [1, 3])
def test_decode_packs_the_gqa_group_and_splits_the_kv(monkeypatch, fmt, query_len):
    q, k, v = heads_last(2, 8, query_len, 64), heads_last(2, 2, 77, 64), heads_last(2, 2, 77, 64)
    assert kernel.decode_rows(query_len, 4, 16) == 16
    monkeypatch.setattr(kernel, "DECODE_PROGRAMS_PER_SM", 3)  # (the CPU counts as 4 SMs here)
    assert kernel._splits(2, 2, 77, 16, torch.device("cpu")) == 3
    check(q, k, v, gqa=True, fmt=fmt)
    mask = torch.randn(2, 1, query_len, 77)
    mask[..., 5:9] = float("-inf")
    check(q, k, v, mask=mask, gqa=True, fmt=fmt)


def test_decode_causal_query_sees_the_first_keys_only():
    q, k, v = heads_last(1, 4, 1, 32), heads_last(1, 4, 50, 32), heads_last(1, 4, 50, 32)
    check(q, k, v, causal=True, fmt=INT8, scale=0.3)


def test_int8_smoothing_handles_keys_with_offset_outlier_channels():
    q = heads_last(1, 2, 33, 64, torch.float32)
    k, v = heads_last(1, 2, 40, 64, torch.float32), heads_last(1, 2, 40, 64, torch.float32)
    k[..., [3, 17, 40]] += 20.0  # channels offset in every token, as in LLM keys
    out = check(q, k, v, fmt=INT8)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()
    unsmoothed = formats.register_attention_format(
        formats.AttentionFormat("test_attn_int8_t16_plain", "int8_t16", "int8_t16", "fp8_e4m3_t16")
    )
    without = reference.attention(q, k, v, None, False, None, False, unsmoothed.name)
    assert sqnr(exact, out) >= 25.0 > sqnr(exact, without)


def test_nan_in_a_key_block_and_zero_query_rows():
    q = heads_last(1, 1, 20, 32, torch.float32)
    k, v = heads_last(1, 1, 40, 32, torch.float32), heads_last(1, 1, 40, 32, torch.float32)
    q[:, :, 16:] = 0  # zero (padding) query rows: uniform attention, no NaN
    out = launch(q, k, v, fmt=FP8)
    assert torch.isfinite(out).all()
    k[0, 0, 21, 3] = float("nan")  # block 1 of K: every query sees it
    out = launch(q, k, v, fmt=FP8)
    expected = reference.attention(q, k, v, None, False, None, False, FP8)
    assert out.isnan().all() and expected.isnan().all()


def test_triton_op_body_runs_in_the_interpreter():
    q, k, v = heads_last(1, 4, 17, 32), heads_last(1, 2, 17, 32), heads_last(1, 2, 17, 32)
    out = torch.ops.lowbit.block_attention_triton(q, k, v, None, True, None, True, INT8, torch.float16)
    expected = torch.ops.lowbit.block_attention(q, k, v, None, True, None, True, INT8, torch.float16)
    assert out.dtype == expected.dtype == torch.float16 and out.is_contiguous()
    assert sqnr(expected.float(), out.float()) >= KERNEL_VS_REFERENCE_DB


@pytest.mark.parametrize("mask_kind", [None, "float", "bool"])
def test_decode_through_the_op_runs_unquantized_sdpa(monkeypatch, mask_kind):
    # Decode steps read bf16 K/V either way; quantizing them only adds work (DECODE_SDPA).
    q, k, v = heads_last(2, 8, 1, 32), heads_last(2, 2, 40, 32), heads_last(2, 2, 40, 32)
    mask = {None: None, "float": torch.randn(2, 1, 1, 40, dtype=torch.float16), "bool": torch.rand(2, 8, 1, 40) > 0.3}
    mask = mask[mask_kind]
    assert kernel.decode_rows(1, 4, 16) is not None
    out = torch.ops.lowbit.block_attention_triton(q, k, v, mask, False, 0.3, True, INT8, torch.float16)
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    assert out.is_contiguous() and out.shape == exact.shape
    torch.testing.assert_close(out, exact, rtol=0, atol=0)
    monkeypatch.setattr(kernel, "DECODE_SDPA", False)  # the packed decode tile, quantized
    quantized = torch.ops.lowbit.block_attention_triton(q, k, v, mask, False, 0.3, True, INT8, torch.float16)
    expected = torch.ops.lowbit.block_attention(q, k, v, mask, False, 0.3, True, INT8, torch.float16)
    assert sqnr(expected.float(), quantized.float()) >= KERNEL_VS_REFERENCE_DB
    assert sqnr(exact.float(), quantized.float()) < KERNEL_VS_REFERENCE_DB  # it did quantize


def test_opcheck_of_the_triton_op_at_decode():
    # symbolic head counts (opcheck's dynamic-shape pass): no guard, SDPA in its GQA form
    q, k, v = heads_last(1, 4, 1, 32), heads_last(1, 2, 40, 32), heads_last(1, 2, 40, 32)
    args = (q, k, v, None, False, None, True, INT8, torch.float16)
    torch.library.opcheck(torch.ops.lowbit.block_attention_triton.default, args)


def test_supported_formats():
    for name in formats.BUILTIN_ATTENTION_FORMATS:
        assert kernel.supports(formats.get_attention_format(name)) is None, name
    assert "quantizes P" in kernel.supports(formats.get_attention_format("fp8_e4m3_row"))


def test_report_names_what_runs(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    name = ops.kernel_name
    fp8 = name("block_attention", torch.bfloat16, cuda, None, x_fmt="attn_fp8_t128")
    assert fp8 == "block_attention [triton:attn_fp8; decode steps: bf16 SDPA]"
    int8 = name("block_attention", torch.float16, cuda, None, x_fmt="attn_int8_t64")
    assert int8 == "block_attention [triton:attn_int8; decode steps: bf16 SDPA]"
    monkeypatch.setattr(kernel, "DECODE_SDPA", False)
    assert name("block_attention", torch.bfloat16, cuda, None, x_fmt="attn_fp8_t128") == "block_attention [triton:attn_fp8]"
    assert name("block_attention", torch.bfloat16, cpu, None, x_fmt="attn_int8_t64") == "block_attention [reference]"
    assert name("attention", torch.bfloat16, cuda, None, x_fmt="fp8_e4m3_row") == "attention [reference]"


def _attention_graph(device: str, kv_heads: int = 2, head_dim: int = 128) -> torch.fx.Graph:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        values = {
            "q": torch.empty(2, 8, 33, head_dim, device=device, dtype=torch.bfloat16),
            "k": torch.empty(2, kv_heads, 33, head_dim, device=device, dtype=torch.bfloat16),
            "v": torch.empty(2, kv_heads, 33, head_dim, device=device, dtype=torch.bfloat16),
        }
        out = torch.empty(2, 8, 33, head_dim, device=device, dtype=torch.bfloat16)
    graph = torch.fx.Graph()
    nodes = []
    for name, value in values.items():
        node = graph.placeholder(name)
        node.meta["val"] = value
        nodes.append(node)
    args = (*nodes, None, True, None, True, "attn_fp8_t128", torch.bfloat16)
    call = graph.call_function(torch.ops.lowbit.block_attention.default, args)
    call.meta["val"] = out
    graph.output(call)
    return graph


def test_lowering_swaps_block_attention_for_the_triton_op_on_cuda():
    graph = _attention_graph("cuda")
    assert ops.use_device_kernels(graph) == {"triton:attn_fp8": 1}
    (node,) = [n for n in graph.nodes if n.op == "call_function"]
    assert node.target is torch.ops.lowbit.block_attention_triton.default
    graph.lint()


@pytest.mark.parametrize("device, kv_heads, head_dim", [("cpu", 2, 128), ("cuda", 3, 128), ("cuda", 2, 512)])
def test_lowering_leaves_what_the_kernel_cannot_run_to_the_reference(device, kv_heads, head_dim):
    graph = _attention_graph(device, kv_heads, head_dim)  # CPU; 8 q heads on 3 kv heads; D > 256
    assert ops.use_device_kernels(graph) == {}


@pytest.mark.parametrize("split,per_program", [(True, 1), (True, 4), (False, 2)])
def test_kv_prepass_codes_and_scales_match_the_reference(monkeypatch, split, per_program):
    # 7 blocks of 16 keys, the last one partial: programs of 1, 2 and 4 blocks (the next block's
    # tile is loaded before this one is quantized), K and V in programs of their own or together.
    monkeypatch.setattr(kernel, "QUANTIZE_KV_SPLIT", split)
    monkeypatch.setattr(kernel, "QUANTIZE_KV_BLOCKS_PER_PROGRAM", per_program)
    k, v = heads_last(2, 3, 101, 32), heads_last(2, 3, 101, 32)
    k[0, 1, 40:50, 3] += 30.0  # an outlier channel in one block only
    attention_format = formats.get_attention_format(INT8)
    constants = dict(HEAD_DIM=32, HEAD_DIM_V=32, SOFT_FP8=True)
    k_codes, k_scales, v_codes, v_scales = kernel._quantize_kv(k, v, attention_format, 16, constants, None)
    assert k_codes.shape == (6, 112, 32) and v_codes.shape == (6, 32, 112)
    _, k_fmt, v_fmt = attention_format.formats
    for codes, scales, x, fmt in (
        (k_codes, k_scales, reference.smooth_keys(k, 16), k_fmt),
        (v_codes.transpose(1, 2), v_scales, v.float(), v_fmt),
    ):
        dequantized = (codes.float().view(6, 7, 16, 32) * scales.view(6, 7, 1, 1)).view(6, 112, 32)
        assert torch.all(dequantized[:, 101:] == 0)  # zero padding past S
        expected = reference.fake_quantize(x, fmt).reshape(6, 101, 32)
        torch.testing.assert_close(dequantized[:, :101], expected, rtol=0, atol=1e-6)
