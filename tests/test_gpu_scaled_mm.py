"""GPU suite for the scaled-GEMM kernels (`pytest -m gpu`): every tuner candidate against the
reference op at odd sizes with poisoned outputs, zero rows and NaN, opcheck, the recipes through
Inductor with the kernel (and the activation quantization fused into its producer) in the output
code, and dynamic M through one graph."""

from __future__ import annotations

import re

import pytest
import torch

triton = pytest.importorskip("triton")
from torch._dynamo.utils import counters
from torch.testing import FileCheck

from lowbit_compile import ops, reference
from lowbit_compile.formats import get_format
from lowbit_compile.models import LlamaConfig, TinyLlama
from lowbit_compile.report import sqnr
from lowbit_compile.testing import run_and_get_graphs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PAIRS = (
    ("fp8_e4m3_row", "fp8_e4m3_row"),
    ("fp8_e4m3_tensor", "fp8_e4m3_tensor"),
    ("int8_row", "int8_row"),
    ("fp8_e4m3_1x128", "fp8_e4m3_128x128"),
)
ROWS = (1, 3, 17, 37, 300)


@pytest.fixture(autouse=True)
def _default_configs(monkeypatch):
    monkeypatch.setenv("LOWBIT_AUTOTUNE", "0")


def _quantized(x_fmt, w_fmt, m, n, k, dtype=torch.bfloat16):
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda")
    return reference.quantize(x, x_fmt), reference.quantize(w, w_fmt)


def _reference(qx, qw, bias, x_fmt, w_fmt):
    empty = torch.empty(0, device="cuda")
    return ops._scaled_mm_reference(qx.data, qx.scale, empty, qw.data, qw.scale, empty, bias, x_fmt, w_fmt, torch.float32)


@pytest.mark.parametrize("x_fmt, w_fmt", PAIRS)
def test_every_candidate_config_matches_reference(x_fmt, w_fmt):
    from lowbit_compile.kernels import common
    from lowbit_compile.kernels import scaled_mm as scaled

    torch.manual_seed(0)
    n, k = 200, 640  # N not a multiple of the tiles, K a multiple of 128 but not of 256 or 512
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    too_large = []
    for first, last, bucket_m in common.M_BUCKETS:
        rows = [m for m in ROWS if m >= first and (last is None or m <= last)]
        for m in rows:
            qx, qw = _quantized(x_fmt, w_fmt, m, n, k)
            meta = scaled.ScaledMeta.of(get_format(x_fmt), get_format(w_fmt), qw.data)
            x_scale = qx.scale.reshape(1, 1) if meta.x_per_tensor else qx.scale
            expected = _reference(qx, qw, bias, x_fmt, w_fmt)
            for index, config in enumerate(scaled._candidates(bucket_m, meta)):
                out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
                try:
                    scaled.launch(qx.data, x_scale, qw.data, qw.scale, bias, out, meta, config)
                except triton.runtime.errors.OutOfResources:
                    assert index > 0, f"the default config {config} must fit"
                    too_large.append(config)
                    continue
                quality = sqnr(expected, out.float())
                assert quality >= 45, (config, m, quality)
    print(f"{x_fmt} x {w_fmt}: configs out of shared memory: {too_large}")


@pytest.mark.parametrize("x_fmt, w_fmt", PAIRS)
def test_op_on_cuda_runs_the_kernel_zero_rows_and_nan(x_fmt, w_fmt):
    torch.manual_seed(1)
    empty = torch.empty(0, device="cuda")
    w = reference.quantize(torch.randn(136, 256, device="cuda"), w_fmt)
    for m in ROWS:
        x = torch.randn(2, m, 256, device="cuda", dtype=torch.bfloat16)
        x[0, 0] = 0
        x[1, -1, 7] = float("nan")
        qx = reference.quantize(x, x_fmt)
        args = (qx.data, qx.scale, empty, w.data, w.scale, empty, None, x_fmt, w_fmt, torch.bfloat16)
        out = torch.ops.lowbit.scaled_mm(*args)
        expected = ops._scaled_mm_reference(*args[:-1], torch.float32)
        if "tensor" in x_fmt:  # one scale for all rows: the NaN reaches every row
            assert out.isnan().all()
            continue
        assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0]))
        assert out[1, -1].isnan().all()
        finite = ~expected.isnan()
        assert sqnr(expected[finite], out.float()[finite]) >= 45


def test_opcheck_on_cuda():
    torch.manual_seed(2)
    qx, qw = _quantized("fp8_e4m3_row", "fp8_e4m3_row", 5, 64, 256)
    plan = ops._scaled_mm_plan(torch.bfloat16, qx.data.device, qw.data, "fp8_e4m3_row", "fp8_e4m3_row", None)
    torch.library.opcheck(
        torch.ops.lowbit.scaled_mm_triton.default,
        (qx.data, qx.scale, qw.data, qw.scale, None, "fp8_e4m3_row", "fp8_e4m3_row", torch.bfloat16, plan),
    )
    empty = torch.empty(0, device="cuda")
    torch.library.opcheck(
        torch.ops.lowbit.scaled_mm.default,
        (qx.data, qx.scale, empty, qw.data, qw.scale, empty, None, "fp8_e4m3_row", "fp8_e4m3_row", torch.bfloat16),
    )


LLAMA = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8, num_kv_heads=2)


def _kernel_sources(code: str) -> list[str]:
    """The source of each @triton.jit kernel in Inductor's output code."""
    return [block for block in re.split(r"@triton\.jit", code)[1:]]


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("name, kernel", [("fp8", "triton:fp8"), ("w8a8", "triton:int8"), ("fp8-block", "triton:fp8_block")])
def test_llama_output_code_holds_the_kernel_and_fused_quantization(name, kernel):
    """Inductor's output holds the scaled-GEMM kernel (no opaque reference call), and every
    activation quantization shares a kernel with the op that produces the activation: no kernel
    only reads a bf16 activation to quantize it."""
    torch.manual_seed(0)
    model = TinyLlama(LLAMA).eval().to("cuda", torch.bfloat16)
    tokens = torch.randint(0, LLAMA.vocab_size, (2, 64), device="cuda")
    with torch.no_grad():
        expected = model(tokens)
    logits, graphs = run_and_get_graphs(model, tokens, policy=name)
    code = graphs["output_code"]
    FileCheck().check("@triton.jit").check("def scaled_mm_kernel(").run(code)
    assert "torch.ops.lowbit.scaled_mm.default(" not in code
    assert f"scaled_mm [{kernel}]" in graphs["report"]
    assert sqnr(expected, logits) > 20
    # Inductor names fused kernels after the ops they hold: a quantization fused into its producer
    # has the producer's ops in its name (mean/rsqrt for RMSNorm, silu/mul, add, bmm/attention...).
    quant_only = []
    for source in _kernel_sources(code):
        header = source.split("\n", 2)[1]
        if "scaled_mm_kernel" in header or "splitk_sum" in header:
            continue
        fp8_or_int8_store = "tl.float8e4nv" in source or "tl.int8" in source
        name_ops = re.search(r"def (triton_\w+)\(", header)
        if fp8_or_int8_store and name_ops and not re.search(r"mean|rsqrt|pow|silu|sigmoid|add|embedding|bmm|mm", name_ops.group(1)):
            quant_only.append(name_ops.group(1))
    assert not quant_only, f"kernels that only quantize an activation: {quant_only}"


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("name", ["fp8", "auto"])
def test_dynamic_m_one_graph_every_bucket(name):
    torch.manual_seed(3)
    layer = torch.nn.Linear(512, 320).to("cuda", torch.bfloat16).eval()
    compiled = torch.compile(layer, backend="lowbit", dynamic=True, options={"policy": name})
    fmt = "fp8_e4m3_row" if name == "fp8" else "int8_row"
    qw = reference.quantize(layer.weight.detach(), fmt)
    empty = torch.empty(0, device="cuda")
    with torch.no_grad():
        for m in (2, 7, 16, 17, 100, 127, 128, 129, 700, 5, 2):
            x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
            if name == "auto" and m < 128:
                expected = ops._weight_only_mm_reference(x, qw.data, qw.scale, empty, empty, layer.bias, fmt, torch.float32)
            else:
                qx = reference.quantize(x, fmt)
                expected = ops._scaled_mm_reference(
                    qx.data, qx.scale, empty, qw.data, qw.scale, empty, layer.bias, fmt, fmt, torch.float32
                )
            assert sqnr(expected, compiled(x).float()) >= 40, m
    assert counters["stats"]["unique_graphs"] == 1
