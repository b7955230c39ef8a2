"""Weight-only Triton kernels against the reference op, in Triton's interpreter (CPU, CI).

The interpreter runs the same kernel code as the GPU at tiny sizes. Its bf16 `tl.dot` is wrong
(Triton 3.9 interpreter: a plain bf16 16x16 dot is off by 1e10), so the tensor-core paths run with
fp16 activations here and with both dtypes in the GPU suite (tests/test_gpu_kernels.py); the GEMV
path runs with both dtypes here.
"""

from __future__ import annotations

import os
import unittest.mock

import pytest
import torch
import torch.fx

from lowbit_compile import reference
from lowbit_compile.formats import get_format
from lowbit_compile.report import sqnr

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 before triton is imported"
)

from lowbit_compile import ops  # noqa: E402
from lowbit_compile.kernels import common, weight_only  # noqa: E402

C = weight_only.WeightOnlyConfig
FORMATS = ("int4_g32", "int4_g64_asym", "int4_g128", "int4_g128_asym", "int8_row", "fp8_e4m3_row")


def _weight(fmt_name: str, n: int, k: int):
    q = reference.quantize(torch.randn(n, k), fmt_name)
    zero = q.zero_point if q.zero_point is not None else torch.empty(0)
    return q.data, q.scale, zero


def _reference(x, data, scale, zero, bias, fmt_name):
    empty = torch.empty(0)
    return ops._weight_only_mm_reference(x, data, scale, zero, empty, bias, fmt_name, torch.float32)


def _launch_poisoned(x, data, scale, zero, bias, fmt_name, config):
    meta = weight_only.WeightMeta.of(get_format(fmt_name), data)
    out = torch.full((x.shape[0], meta.n), float("nan"), dtype=x.dtype)
    weight_only.launch(x, data, scale, zero, bias, out, meta, config)
    return out


# Odd sizes: N not a multiple of any BLOCK_N, K a multiple of the group but not of every BLOCK_K.
@pytest.mark.parametrize("fmt_name", FORMATS)
@pytest.mark.parametrize(
    "m, dtype, config",
    [
        (1, torch.bfloat16, C(1, 16, 256, 4, 3)),  # GEMV, tiles span groups
        (1, torch.float16, C(1, 8, 128, 4, 3)),
        (3, torch.float16, C(16, 32, 128, 4, 3)),  # tensor-core tile, inside a g128 group
        (17, torch.float16, C(16, 32, 64, 4, 3)),  # two row tiles, inside g64/g128 groups
        (37, torch.float16, C(32, 16, 256, 4, 3)),  # tiles span groups: dequantize in registers
        (1, torch.bfloat16, C(1, 8, 128, 4, 3, 2)),  # split-K: slices of 2 and 1 tiles, summed
        (1, torch.float16, C(1, 8, 64, 4, 3, 8)),  # split-K with more slices than tiles (empty slices)
        (3, torch.float16, C(16, 32, 128, 4, 3, 2)),  # split-K on tensor cores
        (37, torch.float16, C(32, 16, 64, 4, 3, 4)),
        (3, torch.float16, C(16, 32, 128, 4, 3, 1, 1)),  # swapped (out^T = W @ x^T), inside a g128 group
        (17, torch.float16, C(16, 32, 64, 4, 3, 2, 1)),  # swapped, two row tiles, split-K
        (37, torch.float16, C(32, 16, 256, 4, 3, 1, 1)),  # swapped, tiles span groups
        (37, torch.float16, C(32, 16, 64, 4, 3, 2, 2)),  # swapped, scale after the dot at 32 rows
        (37, torch.float16, C(32, 16, 64, 4, 3, DEQUANT=1)),  # dequantized first, then a 16-bit GEMM
        (17, torch.float16, C(16, 32, 256, 4, 3, DEQUANT=1)),  # K tail masked (384 = 256 + 128)
    ],
)
def test_kernel_matches_reference(fmt_name, m, dtype, config):
    torch.manual_seed(m)
    n, k = 40, 384
    data, scale, zero = _weight(fmt_name, n, k)
    meta = weight_only.WeightMeta.of(get_format(fmt_name), data)
    assert weight_only.config_is_valid(config, meta), f"{config} does not fit {fmt_name}"
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    out = _launch_poisoned(x, data, scale, zero, bias, fmt_name, config)
    expected = _reference(x, data, scale, zero, bias, fmt_name)
    assert not out.isnan().any()
    # fp32 accumulation, one rounding to the 16-bit output: ~50 dB for bf16, ~70 dB for fp16.
    assert sqnr(expected, out.float()) > (45 if dtype is torch.bfloat16 else 60)


def test_every_default_config_is_valid_and_runs():
    torch.manual_seed(0)
    for fmt_name in FORMATS:
        data, scale, zero = _weight(fmt_name, 24, 256)
        meta = weight_only.WeightMeta.of(get_format(fmt_name), data)
        for _, _, bucket_m in weight_only.M_BUCKETS:
            config = weight_only.default_config(bucket_m, meta)
            m = min(bucket_m, 20)
            x = torch.randn(m, 256).half()
            out = _launch_poisoned(x, data, scale, zero, None, fmt_name, config)
            assert sqnr(_reference(x, data, scale, zero, None, fmt_name), out.float()) > 60, (fmt_name, config)


def test_zero_rows_stay_zero_and_nan_stays_in_its_row():
    torch.manual_seed(1)
    data, scale, zero = _weight("int4_g128_asym", 24, 256)
    for m, config in ((1, C(1, 8, 256, 4, 3)), (4, C(16, 16, 128, 4, 3))):
        x = torch.randn(m, 256).half()
        x[0] = 0
        if m > 1:
            x[1, 5] = float("nan")
        out = _launch_poisoned(x, data, scale, zero, None, "int4_g128_asym", config)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        if m > 1:
            assert out[1].isnan().all() and not out[2:].isnan().any()


@pytest.mark.parametrize("m", [1, 2, 16, 17, 129])
def test_op_body_launches_the_bucket_of_each_m(m):
    """`run` (the triton_op's body) launches only the bucket that holds M, into the right shape."""
    torch.manual_seed(m)
    fmt_name = "int4_g64"
    data, scale, zero = _weight(fmt_name, 24, 128)
    meta = weight_only.WeightMeta.of(get_format(fmt_name), data)
    plan = weight_only.plan(meta, torch.float16, False, torch.device("cpu"))
    x = torch.randn(1, m, 128).half()
    out = weight_only.run(x, data, scale, zero, None, fmt_name, torch.float16, plan)
    assert out.shape == (1, m, 24)
    assert sqnr(_reference(x, data, scale, zero, None, fmt_name), out.float()) > 60


@pytest.mark.parametrize("m", [1, 5, 16, 20])
def test_op_body_with_split_k_buckets(m):
    """Split-K buckets keep fp32 partials of at most the bucket's rows and sum them into the output."""
    torch.manual_seed(m)
    fmt_name = "int4_g32"
    data, scale, zero = _weight(fmt_name, 24, 128)
    configs = (C(1, 8, 32, 4, 3, 4), C(16, 16, 32, 4, 3, 2), C(16, 16, 64, 4, 3, 1))
    plan = []
    for (first, last, _), config in zip(((1, 1, 1), (2, 16, 16), (17, None, 32)), configs):
        plan += [first, -1 if last is None else last, *config.as_tuple()]
    bias = torch.randn(24).half()
    x = torch.randn(m, 128).half()
    out = weight_only.run(x, data, scale, zero, bias, fmt_name, torch.float16, plan)
    assert sqnr(_reference(x, data, scale, zero, bias, fmt_name), out.float()) > 60


@pytest.mark.parametrize("buckets", [common.M_BUCKETS, weight_only.M_BUCKETS])
def test_bucket_indicator_covers_every_m_once(buckets):
    for m in [*range(0, 300), 1023, 1024, 1025, 1026, 5000]:
        hits = [common.bucket_indicator(m, first, last) for first, last, _ in buckets]
        assert sum(hits) == (1 if m >= 1 else 0), m


def test_report_names_what_runs():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert ops.kernel_name("weight_only_mm", torch.bfloat16, cuda, "int4_g128_asym") == "weight_only_mm [triton:w4a16]"
    assert ops.kernel_name("weight_only_mm", torch.float16, cuda, "int8_row") == "weight_only_mm [triton:w8a16]"
    assert ops.kernel_name("weight_only_mm", torch.bfloat16, cpu, "int8_row") == "weight_only_mm [reference]"
    assert ops.kernel_name("weight_only_mm", torch.float32, cuda, "int8_row") == "weight_only_mm [reference]"
    assert ops.kernel_name("weight_only_mm", torch.bfloat16, cuda, "mxfp4") == "weight_only_mm [reference]"
    assert ops.kernel_name("scaled_mm", torch.bfloat16, cuda, "int8_row") == "scaled_mm [reference]"


def _fused_graph(device: str, dtype: torch.dtype, fmt_name: str) -> torch.fx.Graph:
    """A one-node graph calling lowbit.weight_only_mm, with fake tensors on `device` as meta["val"]."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    k = 256
    fmt = get_format(fmt_name)
    with FakeTensorMode():
        x = torch.empty(3, 7, k, dtype=dtype, device=device)
        data = torch.empty(64, k // 2 if fmt.bits == 4 else k, dtype=fmt.storage_dtype, device=device)
        groups = k // fmt.group_size if fmt.group_size else 1
        scale = torch.empty(64, groups, dtype=fmt.scale_dtype, device=device)
        zero = torch.empty(64, groups, device=device)
        absent = torch.empty(0, device=device)
        out = torch.empty(3, 7, 64, dtype=dtype, device=device)
    graph = torch.fx.Graph()
    nodes = []
    for name, value in zip(("x", "w_data", "w_scale", "w_zero_point", "w_global_scale"), (x, data, scale, zero, absent)):
        node = graph.placeholder(name)
        node.meta["val"] = value
        nodes.append(node)
    call = graph.call_function(torch.ops.lowbit.weight_only_mm.default, (*nodes, None, fmt_name, dtype))
    call.meta["val"] = out  # as the fused stage leaves it
    graph.output(call)
    return graph


def _targets(graph: torch.fx.Graph) -> list:
    return [node.target for node in graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize("fmt_name, kernel", [("int4_g128_asym", "triton:w4a16"), ("int8_row", "triton:w8a16")])
def test_lowering_swaps_the_op_for_the_triton_op_on_cuda(fmt_name, kernel):
    """The lowering hook (fake CUDA tensors: no GPU needed) replaces the opaque op by the triton_op,
    carrying one tile config per M bucket."""
    graph = _fused_graph("cuda", torch.bfloat16, fmt_name)
    assert ops.use_device_kernels(graph) == {kernel: 1}
    (node,) = [n for n in graph.nodes if n.op == "call_function"]
    assert node.target is torch.ops.lowbit.weight_only_mm_triton.default
    plan = node.args[-1]
    assert len(plan) == weight_only._PLAN_FIELDS * len(weight_only.M_BUCKETS)
    assert [bucket[:2] for bucket in weight_only.unflatten_plan(plan)] == [b[:2] for b in weight_only.M_BUCKETS]
    assert node.meta["val"].shape == (3, 7, 64)
    graph.lint()


@pytest.mark.parametrize(
    "device, dtype, fmt_name",
    [("cpu", torch.bfloat16, "int4_g128_asym"), ("cuda", torch.float32, "int8_row"), ("cuda", torch.bfloat16, "mxfp4")],
)
def test_lowering_leaves_calls_without_a_kernel_to_the_reference(device, dtype, fmt_name):
    graph = _fused_graph(device, dtype, fmt_name)
    assert ops.use_device_kernels(graph) == {}
    assert _targets(graph) == [torch.ops.lowbit.weight_only_mm.default]


# -- the K-major int4 GEMV (weight_only.gemv_kmajor_kernel) ---------------------------------------

INT4_FORMATS = ("int4_g32", "int4_g64_asym", "int4_g128", "int4_g128_asym")
KC = weight_only.KMajorGemvConfig


@pytest.mark.parametrize("fmt_name", INT4_FORMATS)
def test_kmajor_packing_round_trips_exactly(fmt_name):
    data, scale, zero = _weight(fmt_name, 24, 256)
    words, scale_t, zero_t = weight_only.pack_kmajor(data, scale, zero)
    group = get_format(fmt_name).group_size
    assert words.dtype == torch.int32 and words.shape == (256 // 8, 24)
    assert scale_t.shape == (256 // group + 1, 24) and not scale_t[-1].any()  # the counters row
    back = weight_only.unpack_kmajor(words, scale_t, zero_t)
    for before, after in zip((data, scale, zero), back):
        assert torch.equal(before, after)


@pytest.mark.parametrize("fmt_name", INT4_FORMATS)
@pytest.mark.parametrize(
    "m, dtype, config, with_bias",
    [
        (1, torch.bfloat16, KC(16, 4, 1), True),  # one slice, tiles inside every group
        (1, torch.float16, KC(8, 8, 3), False),  # split 3: uneven slices, last program sums
        (3, torch.bfloat16, KC(32, 16, 2), True),  # 3 rows; tiles span g32 / g64 groups
        (1, torch.float16, KC(16, 4, 16), True),  # more slices than tiles: empty slices
    ],
)
def test_gemv_kmajor_matches_reference(fmt_name, m, dtype, config, with_bias):
    torch.manual_seed(m + config.SPLIT_K)
    n, k = 40, 384  # N not a multiple of BLOCK_N, K a multiple of the group but not of every tile
    data, scale, zero = _weight(fmt_name, n, k)
    words, scale_t, zero_t = weight_only.pack_kmajor(data, scale, zero)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype)
    weight_only.launch_gemv_kmajor(x, words, scale_t, zero_t, bias, out, get_format(fmt_name).group_size, config)
    expected = _reference(x, data, scale, zero, bias, fmt_name)
    assert not out.isnan().any()
    assert sqnr(expected, out.float()) > (45 if dtype is torch.bfloat16 else 60)
    assert not scale_t[-1].any(), "split-K counters must be back at zero after the call"


def test_gemv_kmajor_zero_rows_stay_zero_and_nan_stays_in_its_row():
    data, scale, zero = _weight("int4_g128_asym", 24, 256)
    words, scale_t, zero_t = weight_only.pack_kmajor(data, scale, zero)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    x[0] = 0
    x[2, 5] = float("nan")
    out = torch.empty(3, 24, dtype=torch.bfloat16)
    weight_only.launch_gemv_kmajor(x, words, scale_t, zero_t, None, out, 128, KC(8, 8, 2))
    assert torch.equal(out[0], torch.zeros(24, dtype=torch.bfloat16))
    assert out[2].isnan().all() and not out[1].isnan().any()


def test_gemv_kmajor_rejects_a_mismatched_weight():
    data, scale, zero = _weight("int4_g128", 24, 256)
    words, scale_t, zero_t = weight_only.pack_kmajor(data, scale, zero)
    x = torch.randn(1, 512, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="do not match K = 512"):
        weight_only.launch_gemv_kmajor(x, words, scale_t, zero_t, None, torch.empty(1, 24), 128, KC(8, 8))


# -- the op's kernels on K-major weights (what folding packs for int4 weight-only sites on CUDA) --


@pytest.mark.parametrize("fmt_name", INT4_FORMATS)
@pytest.mark.parametrize(
    "m, dtype, config",
    [
        (1, torch.bfloat16, C(1, 16, 64, 4, 1, 2)),  # the K-major GEMV (BLOCK_K = 8 words), split 2
        (3, torch.float16, C(16, 32, 128, 4, 3)),  # tensor-core tile, inside a g128 group
        (17, torch.float16, C(16, 32, 64, 4, 3, 2)),  # two row tiles, split-K
        (37, torch.float16, C(32, 16, 256, 4, 3)),  # tiles span groups: dequantize in registers
        (3, torch.float16, C(16, 32, 128, 4, 3, 1, 1)),  # swapped (out^T = W @ x^T)
        (37, torch.float16, C(32, 16, 64, 4, 3, 2, 2)),  # swapped, scale after the dot at 32 rows
        (37, torch.float16, C(32, 16, 256, 4, 3, 1, 1)),  # swapped, tiles span groups
    ],
)
def test_kernels_read_kmajor_weights(fmt_name, m, dtype, config):
    torch.manual_seed(m + config.BLOCK_K)
    n, k = 40, 384  # N not a multiple of BLOCK_N, K a multiple of the group but not of every BLOCK_K
    data, scale, zero = _weight(fmt_name, n, k)
    words, scale_t, zero_t = weight_only.pack_kmajor(data, scale, zero)
    meta = weight_only.WeightMeta.of(get_format(fmt_name), words)
    assert meta.kmajor and (meta.n, meta.k) == (n, k)
    assert weight_only.config_is_valid(config, meta), f"{config} does not fit {fmt_name}"
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    weight_only.launch(x, words, scale_t, zero_t, bias, out, meta, config)
    expected = _reference(x, data, scale, zero, bias, fmt_name)
    assert not out.isnan().any()
    assert sqnr(expected, out.float()) > (45 if dtype is torch.bfloat16 else 60)
    assert not scale_t[-1].any()


@pytest.mark.parametrize("m", [1, 2, 16, 17, 130])
def test_op_body_on_kmajor_weights_launches_the_bucket_of_each_m(m):
    torch.manual_seed(m)
    n, k = 24, 256
    data, scale, zero = _weight("int4_g128_asym", n, k)
    words, scale_t, zero_t = weight_only.pack_kmajor(data, scale, zero)
    meta = weight_only.WeightMeta.of(get_format("int4_g128_asym"), words)
    buckets = weight_only.M_BUCKETS
    flat = common.flatten_plan(
        [(first, last, weight_only.default_config(bucket_m, meta).as_tuple()) for first, last, bucket_m in buckets]
    )
    assert weight_only.unflatten_plan(flat)[0][2].BLOCK_M == 1  # the M = 1 bucket: the K-major GEMV
    x = torch.randn(m, k, dtype=torch.float16)
    out = weight_only.run(x, words, scale_t, zero_t, None, "int4_g128_asym", torch.float16, flat)
    assert out.shape == (m, n)
    expected = _reference(x, data, scale, zero, None, "int4_g128_asym")
    assert sqnr(expected, out.float()) > 60


# K-major packing is for int4 only: 8-bit formats have the one (reference) layout
LAYOUTS = [(f, False) for f in FORMATS] + [(f, True) for f in FORMATS if get_format(f).bits == 4]


@pytest.mark.parametrize("fmt_name, kmajor", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_kernel_gives_the_reference_values(fmt_name, dtype, kmajor):
    """`dequantize_kernel` (the DEQUANT configs' pass) writes exactly the reference's values, cast
    once to the output dtype, from either int4 layout; N and K not multiples of its tile. (The
    interpreter's fp32 -> bf16 cast truncates: one bf16 step allowed there, exact on the GPU suite.)"""
    torch.manual_seed(3)
    n, k = 40, 384
    data, scale, zero = _weight(fmt_name, n, k)
    packed = weight_only.pack_kmajor(data, scale, zero) if kmajor else (data, scale, zero)
    meta = weight_only.WeightMeta.of(get_format(fmt_name), packed[0])
    out = torch.full((n, k), float("nan"), dtype=dtype)
    weight_only.launch_dequantize(*packed, out, meta)
    q = reference.QuantizedTensor(data, scale, zero if zero.numel() else None)
    rtol = 2**-7 if dtype is torch.bfloat16 else 0
    torch.testing.assert_close(out, reference.dequantize(q, fmt_name).to(dtype), rtol=rtol, atol=0)
    skipped = torch.full((n, k), float("nan"), dtype=dtype)
    weight_only.launch_dequantize(*packed, skipped, meta, active=0)  # an inactive bucket launches nothing
    assert skipped.isnan().all()


def test_dequant_configs_are_candidates_only_above_128_rows():
    data, scale, zero = _weight("int4_g128_asym", 4096, 4096)
    meta = weight_only.WeightMeta.of(get_format("int4_g128_asym"), data)
    for _, last, bucket_m in weight_only.M_BUCKETS:
        dequant = [c for c in weight_only._candidates(bucket_m, meta) if c.DEQUANT]
        assert bool(dequant) == (bucket_m > 128), bucket_m
        assert all(weight_only.config_is_valid(c, meta) for c in dequant)
    assert not weight_only.config_is_valid(C(1, 16, 256, 4, 3, DEQUANT=1), meta)  # no GEMV on a dense weight
    assert not weight_only.config_is_valid(C(16, 32, 128, 4, 3, 2, DEQUANT=1), meta)


@pytest.mark.parametrize("kmajor", [False, True])
def test_op_body_runs_the_dequant_bucket_at_large_m(kmajor):
    """With a DEQUANT config in the largest bucket, M = 1100 runs it (and only it) through `run`."""
    torch.manual_seed(5)
    n, k = 24, 256
    data, scale, zero = _weight("int4_g64_asym", n, k)
    packed = weight_only.pack_kmajor(data, scale, zero) if kmajor else (data, scale, zero)
    meta = weight_only.WeightMeta.of(get_format("int4_g64_asym"), packed[0])
    buckets = [(first, last, weight_only.default_config(m_at, meta)) for first, last, m_at in weight_only.M_BUCKETS]
    buckets[-1] = (*buckets[-1][:2], C(128, 32, 64, 4, 3, DEQUANT=1))
    flat = common.flatten_plan([(first, last, config.as_tuple()) for first, last, config in buckets])
    linear_calls = []
    real_linear = torch.nn.functional.linear

    def spy(*args, **kwargs):
        linear_calls.append(args[1].shape)
        return real_linear(*args, **kwargs)

    for m in (3, 1100):
        x = torch.randn(m, k, dtype=torch.float16)
        with unittest.mock.patch.object(torch.nn.functional, "linear", spy):
            out = weight_only.run(x, *packed, None, "int4_g64_asym", torch.float16, flat)
        assert out.shape == (m, n)
        assert sqnr(_reference(x, data, scale, zero, None, "int4_g64_asym"), out.float()) > 60
    assert linear_calls == [(n, k)]  # only M = 1100 (static, in the DEQUANT bucket): the dense weight to cuBLAS


@pytest.mark.parametrize("fmt_name, kmajor", [("int4_g64_asym", False), ("int4_g32", True), ("int8_row", False)])
def test_dequant_config_in_chunks_of_rows(monkeypatch, fmt_name, kmajor):
    """A weight over `DEQUANT_CHUNK_ELEMENTS` is dequantized and multiplied chunk by chunk (rows
    256, 256, 88 here), each chunk writing its own output and bias columns; `run` then keeps the
    Triton tile even at a static M (cuBLAS only takes a weight in one chunk)."""
    torch.manual_seed(6)
    n, k = 600, 128
    monkeypatch.setattr(weight_only, "DEQUANT_CHUNK_ELEMENTS", 256 * k)
    data, scale, zero = _weight(fmt_name, n, k)
    packed = weight_only.pack_kmajor(data, scale, zero) if kmajor else (data, scale, zero)
    meta = weight_only.WeightMeta.of(get_format(fmt_name), packed[0])
    assert weight_only.dequant_chunk_rows(meta) == 256
    calls = []
    real = weight_only.launch_dequantize
    monkeypatch.setattr(weight_only, "launch_dequantize", lambda *a, **kw: calls.append(kw["n0"]) or real(*a, **kw))
    x = torch.randn(37, k, dtype=torch.float16)
    bias = torch.randn(n).half()
    out = _launch_poisoned(x, *packed, bias, fmt_name, C(32, 64, 64, 4, 3, DEQUANT=1))
    assert calls == [0, 256, 512]
    expected = _reference(x, data, scale, zero, bias, fmt_name)
    assert sqnr(expected, out.float()) > 60

    plan = common.flatten_plan([(1, None, C(32, 64, 64, 4, 3, DEQUANT=1).as_tuple())])
    out = weight_only.run(x, *packed, bias, fmt_name, torch.float16, plan)
    assert sqnr(expected, out.float()) > 60
