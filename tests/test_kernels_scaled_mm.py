"""Scaled-GEMM (A8W8) Triton kernels against the reference op, in Triton's interpreter (CPU, CI):
fp8 e4m3 per token / per tensor, int8 per token, fp8 1x128 x 128x128 blocks; plain, swapped and
split-K tiles; the op bodies (`scaled_mm`, and `auto_mm`'s two halves); the lowering hook on fake
CUDA tensors; the report's kernel names."""

from __future__ import annotations

import os

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
from lowbit_compile.kernels import scaled_mm as scaled  # noqa: E402

C = scaled.ScaledMMConfig
PAIRS = (
    ("fp8_e4m3_row", "fp8_e4m3_row"),
    ("fp8_e4m3_tensor", "fp8_e4m3_tensor"),
    ("fp8_e4m3_row", "fp8_e4m3_tensor"),
    ("int8_row", "int8_row"),
    ("fp8_e4m3_1x128", "fp8_e4m3_128x128"),
)


def _operands(x_fmt: str, w_fmt: str, m: int, n: int, k: int, bias: bool = True):
    x, w = torch.randn(m, k), torch.randn(n, k)
    w[:, 3] *= 20  # an outlier input channel (block scales see it in one block only)
    qx, qw = reference.quantize(x, x_fmt), reference.quantize(w, w_fmt)
    return qx.data, qx.scale, qw.data, qw.scale, torch.randn(n) if bias else None


def _reference(x_data, x_scale, w_data, w_scale, bias, x_fmt, w_fmt):
    empty = torch.empty(0)
    return ops._scaled_mm_reference(x_data, x_scale, empty, w_data, w_scale, empty, bias, x_fmt, w_fmt, torch.float32)


def _launch_poisoned(x_data, x_scale, w_data, w_scale, bias, x_fmt, w_fmt, config, out_dtype=torch.float32):
    meta = scaled.ScaledMeta.of(get_format(x_fmt), get_format(w_fmt), w_data)
    assert scaled.config_is_valid(config, meta), config
    out = torch.full((x_data.shape[0], meta.n), float("nan"), dtype=out_dtype)
    x_scale = x_scale.reshape(1, 1) if meta.x_per_tensor else x_scale
    scaled.launch(x_data, x_scale, w_data, w_scale, bias, out, meta, config)
    return out


def test_supported_pairs():
    for x_fmt, w_fmt in PAIRS:
        assert scaled.supports(get_format(x_fmt), get_format(w_fmt)) is None, (x_fmt, w_fmt)
    for x_fmt, w_fmt, why in (
        ("fp8_e4m3_row", "int8_row", "fp8 e4m3 x fp8 e4m3 or int8 x int8"),
        ("mxfp8", "mxfp8", "symmetric fp32 scales"),
        ("fp8_e4m3_1x128", "fp8_e4m3_row", "1x128 x 128x128 blocks"),
    ):
        assert why in scaled.supports(get_format(x_fmt), get_format(w_fmt)), (x_fmt, w_fmt)


# Odd sizes: N not a multiple of any BLOCK_N; K a multiple of 128 (blocks) but not of every BLOCK_K.
@pytest.mark.parametrize("x_fmt, w_fmt", PAIRS)
@pytest.mark.parametrize(
    "m, config",
    [
        (1, C(16, 32, 128, 4, 3, 1, 1)),  # decode: swapped tile
        (3, C(16, 32, 128, 4, 3)),  # plain tile
        (17, C(16, 16, 64, 4, 3)),  # two row tiles, half-block K steps
        (37, C(32, 32, 128, 4, 3, 2)),  # split K (slices of 2 and 1 blocks)
        (5, C(16, 64, 64, 4, 3, 4, 1)),  # swapped and split K (an empty slice)
    ],
)
def test_kernel_matches_reference(x_fmt, w_fmt, m, config):
    torch.manual_seed(m)
    n, k = 40, 384
    operands = _operands(x_fmt, w_fmt, m, n, k)
    out = _launch_poisoned(*operands, x_fmt, w_fmt, config)
    expected = _reference(*operands, x_fmt, w_fmt)
    assert not out.isnan().any()
    assert sqnr(expected, out) > 60


@pytest.mark.parametrize("x_fmt, w_fmt", [p for p in PAIRS if "1x128" not in p[0]])
def test_masked_k_tail(x_fmt, w_fmt):
    """A K step wider than K's tail (384 = 256 + a masked half step), for per-row/tensor scales."""
    torch.manual_seed(37)
    operands = _operands(x_fmt, w_fmt, 37, 40, 384)
    out = _launch_poisoned(*operands, x_fmt, w_fmt, C(32, 16, 256, 4, 3))
    assert sqnr(_reference(*operands, x_fmt, w_fmt), out) > 60


BLOCK = ("fp8_e4m3_1x128", "fp8_e4m3_128x128")


# The block kernel (`scaled_mm_block_kernel`): one weight scale per 128-wide K step; paired steps
# with an odd number of steps (a masked second half), split K whose last slice is half a pair.
@pytest.mark.parametrize(
    "m, n, k, config",
    [
        (37, 40, 384, C(32, 32, 128, 4, 3)),  # three steps, N and M past the tile edges
        (17, 200, 256, C(16, 64, 128, 4, 3)),  # tiles of 64 columns: two per 128-row weight block
        (37, 40, 512, C(32, 32, 128, 4, 2, 1, 0, 1)),  # paired, two pairs
        (37, 40, 384, C(32, 32, 128, 4, 2, 1, 0, 1)),  # paired, the second pair is half
        (5, 40, 640, C(16, 16, 128, 4, 2, 2, 0, 1)),  # paired and split K: slices of 2 pairs and half a pair
        (300, 136, 384, C(64, 128, 128, 4, 2, 1, 0, 1)),  # paired, the large-M tile shape
        (37, 40, 512, C(32, 32, 128, 4, 2, 1, 0, 2)),  # overlapped pairs (PAIRED=2), two pairs
        (37, 40, 384, C(32, 32, 128, 4, 2, 1, 0, 2)),  # overlapped, the second pair is half
        (5, 40, 640, C(16, 16, 128, 4, 2, 2, 0, 2)),  # overlapped and split K
    ],
)
def test_block_kernel_matches_reference(m, n, k, config):
    torch.manual_seed(m + k)
    operands = _operands(*BLOCK, m, n, k)
    meta = scaled.ScaledMeta.of(get_format(BLOCK[0]), get_format(BLOCK[1]), operands[2])
    assert scaled.uses_block_kernel(meta, config)
    out = _launch_poisoned(*operands, *BLOCK, config)
    assert not out.isnan().any()
    assert sqnr(_reference(*operands, *BLOCK), out) > 60


def test_which_block_tiles_run_the_block_kernel():
    meta = scaled.ScaledMeta(4096, 4096, False, True, False, False)
    assert scaled.uses_block_kernel(meta, C(128, 128, 128, 8, 3))
    assert not scaled.uses_block_kernel(meta, C(64, 256, 128, 8, 3))  # two weight blocks per tile
    assert not scaled.uses_block_kernel(meta, C(16, 64, 128, 4, 4, 2, 1))  # swapped (decode)
    assert not scaled.uses_block_kernel(meta, C(16, 16, 64, 4, 3))  # half-block K steps
    assert not scaled.config_is_valid(C(64, 256, 128, 8, 2, 1, 0, 1), meta)  # only the block kernel pairs
    row_meta = scaled.ScaledMeta(4096, 4096, False, False, False, False)
    assert not scaled.uses_block_kernel(row_meta, C(128, 128, 128, 8, 3))


def test_block_scales_reject_k_steps_wider_than_a_block():
    meta = scaled.ScaledMeta(40, 384, False, True, False, False)
    assert not scaled.config_is_valid(C(32, 16, 256, 4, 3), meta)
    assert scaled.config_is_valid(C(32, 16, 128, 4, 3), meta)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_output(out_dtype):
    torch.manual_seed(2)
    operands = _operands("fp8_e4m3_row", "fp8_e4m3_row", 3, 40, 256)
    out = _launch_poisoned(*operands, "fp8_e4m3_row", "fp8_e4m3_row", C(16, 32, 128, 4, 3, 2, 1), out_dtype)
    assert out.dtype == out_dtype
    assert sqnr(_reference(*operands, "fp8_e4m3_row", "fp8_e4m3_row"), out.float()) > 40


def test_every_default_config_is_valid_and_runs():
    torch.manual_seed(0)
    for x_fmt, w_fmt in PAIRS:
        for _, _, bucket_m in common.M_BUCKETS:
            m = min(bucket_m, 20)
            operands = _operands(x_fmt, w_fmt, m, 24, 256, bias=False)
            meta = scaled.ScaledMeta.of(get_format(x_fmt), get_format(w_fmt), operands[2])
            config = scaled.default_config(bucket_m, meta)
            out = _launch_poisoned(*operands, x_fmt, w_fmt, config)
            assert sqnr(_reference(*operands, x_fmt, w_fmt), out) > 60, (x_fmt, config)


def test_every_candidate_is_valid():
    for x_fmt, w_fmt in PAIRS:
        for n, k in ((24, 256), (4096, 14336)):
            meta = scaled.ScaledMeta(n, k, "int8" in x_fmt, "1x128" in x_fmt, "tensor" in x_fmt, "tensor" in w_fmt)
            for _, _, bucket_m in common.M_BUCKETS:
                candidates = scaled._candidates(bucket_m, meta)
                assert candidates and all(scaled.config_is_valid(c, meta) for c in candidates)


@pytest.mark.parametrize("x_fmt, w_fmt", [("int8_row", "int8_row"), ("fp8_e4m3_1x128", "fp8_e4m3_128x128")])
def test_zero_row_gives_zeros_and_nan_stays_in_its_row(x_fmt, w_fmt):
    torch.manual_seed(1)
    x = torch.randn(4, 256)
    x[0] = 0
    qx = reference.quantize(x, x_fmt)
    x_scale = qx.scale.clone()
    x_scale[1] = float("nan")  # a NaN activation gives its row's scale NaN (int8 codes cannot be NaN)
    w = reference.quantize(torch.randn(24, 256), w_fmt)
    configs = [C(16, 16, 128, 4, 3), C(16, 16, 128, 4, 3, 2, 1)]
    if "1x128" in x_fmt:
        configs.append(C(16, 16, 128, 4, 2, 1, 0, 1))  # paired steps (the held product starts at zero)
        configs.append(C(16, 16, 128, 4, 2, 1, 0, 2))  # overlapped pairs
    for config in configs:
        out = _launch_poisoned(qx.data, x_scale, w.data, w.scale, None, x_fmt, w_fmt, config)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert out[1].isnan().all() and not out[2:].isnan().any()


def _bucket_plan(configs) -> list[int]:
    return common.flatten_plan(
        [(first, last, c.as_tuple()) for (first, last, _), c in zip(((1, 1, 1), (2, 16, 16), (17, None, 32)), configs)]
    )


@pytest.mark.parametrize("m", [1, 5, 16, 20])
def test_op_body_launches_the_bucket_of_each_m(m):
    torch.manual_seed(m)
    x_fmt = w_fmt = "fp8_e4m3_row"
    x_data, x_scale, w_data, w_scale, bias = _operands(x_fmt, w_fmt, m, 24, 256)
    plan = _bucket_plan((C(16, 16, 128, 4, 3, 4, 1), C(16, 16, 64, 4, 3, 2), C(32, 16, 128, 4, 3)))
    out = scaled.run(
        x_data.reshape(1, m, -1), x_scale.reshape(1, m, 1), w_data, w_scale, bias, x_fmt, w_fmt, torch.float32, plan
    )
    assert out.shape == (1, m, 24)
    assert sqnr(_reference(x_data, x_scale, w_data, w_scale, bias, x_fmt, w_fmt), out.reshape(m, 24)) > 60


def test_restrict_plan_clips_buckets():
    plan = _bucket_plan((C(16, 16, 128), C(16, 16, 64), C(32, 16, 128)))
    fields = scaled._PLAN_FIELDS
    assert [b[:2] for b in common.unflatten_plan(common.restrict_plan(plan, fields, 1, 7), fields)] == [(1, 1), (2, 7)]
    high = common.unflatten_plan(common.restrict_plan(plan, fields, 8, None), fields)
    assert [b[:2] for b in high] == [(8, 16), (17, None)]
    assert [b[:2] for b in common.unflatten_plan(common.restrict_plan(plan, fields, 17, None), fields)] == [(17, None)]


@pytest.mark.parametrize("m", [1, 7, 8, 40])
def test_auto_mm_body_switches_family_at_the_threshold(m):
    """`auto_mm_triton`: weight-only below `weight_only_below_m` rows, quantized activations from it
    on, one output; each half matches its own reference."""
    torch.manual_seed(m)
    k, n = 256, 24
    w = reference.quantize(torch.randn(n, k), "int8_row")
    x = torch.randn(2, m, k).half()
    bias = torch.randn(n).half()
    low_plan = weight_only.plan(weight_only.WeightMeta.of(get_format("int8_row"), w.data), x.dtype, True, x.device)
    high_plan = _bucket_plan((C(16, 16, 128, 4, 3, 1, 1), C(16, 16, 64, 4, 3, 2), C(32, 16, 128, 4, 3)))
    absent = torch.empty(0)
    out = ops.auto_mm_triton(x, w.data, w.scale, absent, bias, "int8_row", "int8_row", 16, torch.float16, low_plan, high_plan)
    expected = ops.auto_mm(x, w.data, w.scale, absent, absent, bias, "int8_row", "int8_row", 16, torch.float16)
    assert out.shape == (2, m, n)
    assert sqnr(expected.float(), out.float()) > 45


def test_report_names_what_runs():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    name = ops.kernel_name
    assert name("scaled_mm", torch.bfloat16, cuda, "fp8_e4m3_row", x_fmt="fp8_e4m3_row") == "scaled_mm [triton:fp8]"
    assert name("scaled_mm", torch.bfloat16, cuda, "int8_row", x_fmt="int8_row") == "scaled_mm [triton:int8]"
    block = name("scaled_mm", torch.float16, cuda, "fp8_e4m3_128x128", x_fmt="fp8_e4m3_1x128")
    assert block.startswith("scaled_mm [triton:fp8_block; slower than bf16 at M > 128")
    assert name("scaled_mm", torch.bfloat16, cpu, "int8_row", x_fmt="int8_row") == "scaled_mm [reference]"
    assert name("scaled_mm", torch.bfloat16, cuda, "mxfp8", x_fmt="mxfp8") == "scaled_mm [reference]"
    auto = name("auto_mm", torch.bfloat16, cuda, "int8_row", 128, "int8_row")
    assert auto == "auto_mm [triton:w8a16 below M=128, triton:int8 above]"
    assert name("auto_mm", torch.bfloat16, cpu, "int8_row", 128, "int8_row") == (
        "auto_mm [reference below M=128, reference above]"
    )


def _placeholders(graph: torch.fx.Graph, values: dict) -> list[torch.fx.Node]:
    nodes = []
    for name, value in values.items():
        node = graph.placeholder(name)
        node.meta["val"] = value
        nodes.append(node)
    return nodes


def _scaled_graph(device: str, out_dtype: torch.dtype, x_fmt: str, w_fmt: str) -> torch.fx.Graph:
    from torch._subclasses.fake_tensor import FakeTensorMode

    k, n = 256, 64
    with FakeTensorMode():
        qx = reference.quantize(torch.empty(3, 7, k, device=device), x_fmt)
        qw = reference.quantize(torch.empty(n, k, device=device), w_fmt)
        absent = torch.empty(0, device=device)
        out = torch.empty(3, 7, n, dtype=out_dtype, device=device)
    graph = torch.fx.Graph()
    x_data, x_scale, w_data, w_scale, absent_node = _placeholders(
        graph, {"x_data": qx.data, "x_scale": qx.scale, "w_data": qw.data, "w_scale": qw.scale, "absent": absent}
    )
    args = (x_data, x_scale, absent_node, w_data, w_scale, absent_node, None, x_fmt, w_fmt, out_dtype)
    call = graph.call_function(torch.ops.lowbit.scaled_mm.default, args)
    call.meta["val"] = out
    graph.output(call)
    return graph


def _targets(graph: torch.fx.Graph) -> list:
    return [node.target for node in graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize(
    "x_fmt, w_fmt, kernel",
    [
        ("fp8_e4m3_row", "fp8_e4m3_row", "triton:fp8"),
        ("int8_row", "int8_row", "triton:int8"),
        ("fp8_e4m3_1x128", "fp8_e4m3_128x128", "triton:fp8_block"),
    ],
)
def test_lowering_swaps_scaled_mm_for_the_triton_op_on_cuda(x_fmt, w_fmt, kernel):
    graph = _scaled_graph("cuda", torch.bfloat16, x_fmt, w_fmt)
    assert ops.use_device_kernels(graph) == {kernel: 1}
    (node,) = [n for n in graph.nodes if n.op == "call_function"]
    assert node.target is torch.ops.lowbit.scaled_mm_triton.default
    assert [b[:2] for b in scaled.unflatten_plan(node.args[-1])] == [b[:2] for b in common.M_BUCKETS]
    graph.lint()


@pytest.mark.parametrize("device, x_fmt, w_fmt", [("cpu", "fp8_e4m3_row", "fp8_e4m3_row"), ("cuda", "mxfp8", "mxfp8")])
def test_lowering_leaves_scaled_mm_without_a_kernel_to_the_reference(device, x_fmt, w_fmt):
    graph = _scaled_graph(device, torch.bfloat16, x_fmt, w_fmt)
    assert ops.use_device_kernels(graph) == {}
    assert _targets(graph) == [torch.ops.lowbit.scaled_mm.default]


def test_lowering_swaps_auto_mm_for_both_families_on_cuda():
    from torch._subclasses.fake_tensor import FakeTensorMode

    k, n = 256, 64
    with FakeTensorMode():
        x = torch.empty(3, 7, k, dtype=torch.bfloat16, device="cuda")
        qw = reference.quantize(torch.empty(n, k, device="cuda"), "int8_row")
        absent = torch.empty(0, device="cuda")
        out = torch.empty(3, 7, n, dtype=torch.bfloat16, device="cuda")
    graph = torch.fx.Graph()
    x_node, w_data, w_scale, absent_node = _placeholders(
        graph, {"x": x, "w_data": qw.data, "w_scale": qw.scale, "absent": absent}
    )
    args = (x_node, w_data, w_scale, absent_node, absent_node, None, "int8_row", "int8_row", 128, torch.bfloat16)
    call = graph.call_function(torch.ops.lowbit.auto_mm.default, args)
    call.meta["val"] = out
    graph.output(call)
    assert ops.use_device_kernels(graph) == {"triton:w8a16+triton:int8": 1}
    assert _targets(graph) == [torch.ops.lowbit.auto_mm_triton.default]


@pytest.mark.parametrize("fmt_name", ["int8_row", "fp8_e4m3_row"])
def test_row_quantization_kernel_matches_reference(fmt_name):
    torch.manual_seed(4)
    fmt = get_format(fmt_name)
    x = torch.randn(5, 1500).half() * 3  # K not a multiple of the block
    x[1] = 0  # an all-zero row: scale 0, codes 0
    x[2, 7] = float("nan")  # NaN: the row's scale is NaN
    x[3, :] = torch.arange(1500).half() / 1499 * 127 * 0.5  # many exact .5 ties after scaling
    data, scale = scaled.quantize_rows(x, fmt)
    expected = reference.quantize(x, fmt)
    rows = [0, 1, 3, 4]
    # amax * (1 / qmax), as PyTorch computes amax / qmax on CUDA; on the CPU it divides (1 ulp apart)
    torch.testing.assert_close(scale[rows], expected.scale[rows], rtol=1.2e-7, atol=0)
    assert scale[2].isnan().all() and expected.scale[2].isnan().all()
    if fmt_name == "int8_row":
        codes = (x[rows].float() / scale[rows]).round().clamp(-127, 127).to(torch.int8)
        assert torch.equal(data[rows], codes)
    else:  # the interpreter's fp32 -> fp8 cast rounds wrongly in places (exact on the GPU: test_gpu_scaled_mm)
        assert sqnr(expected.data[rows].float(), data[rows].float()) > 25
    empty, _ = scaled.quantize_rows(x, fmt, active=0)
    assert empty.shape == x.shape  # nothing launched: allocated only
