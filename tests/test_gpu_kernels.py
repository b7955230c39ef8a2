"""GPU suite for the weight-only kernels (`pytest -m gpu`): every tile config against the reference
op at odd sizes, fresh data, poisoned outputs; the op through Inductor with its Triton source in the
output code; dynamic M through one compiled graph; opcheck."""

from __future__ import annotations

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
from lowbit_compile.passes.state import quantize_weight

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

FORMATS = ("int4_g32", "int4_g64_asym", "int4_g128", "int4_g128_asym", "int8_row", "fp8_e4m3_row")
ROWS = (1, 3, 17, 37, 300)


def _weight(fmt_name: str, n: int, k: int):
    q = reference.quantize(torch.randn(n, k, device="cuda"), fmt_name)
    zero = q.zero_point if q.zero_point is not None else torch.empty(0, device="cuda")
    return q.data, q.scale, zero


def _reference(x, data, scale, zero, bias, fmt_name):
    empty = torch.empty(0, device="cuda")
    return ops._weight_only_mm_reference(x, data, scale, zero, empty, bias, fmt_name, torch.float32)


@pytest.fixture(autouse=True)
def _default_configs(monkeypatch):
    """Tuning compiles every candidate; these tests run each config directly or use the defaults."""
    monkeypatch.setenv("LOWBIT_AUTOTUNE", "0")


# Every candidate config (each is one compile) for the formats that exercise each code path.
@pytest.mark.parametrize(
    "fmt_name, dtype, kmajor",
    [
        ("int4_g128_asym", torch.bfloat16, False),
        ("int4_g32", torch.bfloat16, False),
        ("int8_row", torch.bfloat16, False),
        ("int4_g64_asym", torch.float16, False),
        ("fp8_e4m3_row", torch.float16, False),
        # int4 as folding packs it on CUDA (`ops.weight_packing`): the K-major GEMV at M = 1, the
        # tensor-core tiles reading K-major words above
        ("int4_g128_asym", torch.bfloat16, True),
        ("int4_g32", torch.float16, True),
    ],
)
def test_every_candidate_config_matches_reference(fmt_name, dtype, kmajor):
    from lowbit_compile.kernels import weight_only

    torch.manual_seed(0)
    n, k = 200, 384  # N and K not multiples of the tiles; K a multiple of every group size
    data, scale, zero = _weight(fmt_name, n, k)
    packed = weight_only.pack_kmajor(data, scale, zero) if kmajor else (data, scale, zero)
    meta = weight_only.WeightMeta.of(get_format(fmt_name), packed[0])
    assert meta.kmajor == kmajor
    bias = torch.randn(n, device="cuda", dtype=dtype)
    too_large = []
    for first, last, bucket_m in weight_only.M_BUCKETS:
        # a config runs in its bucket only
        rows = [m for m in (*ROWS, 1100) if m >= first and (last is None or m <= last)]
        for index, config in enumerate(weight_only._candidates(bucket_m, meta)):
            for m in rows:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                try:
                    weight_only.launch(x, *packed, bias, out, meta, config)
                except triton.runtime.errors.OutOfResources:
                    assert index > 0, f"the default config {config} must fit"
                    too_large.append(config)  # the tuner skips these
                    break
                quality = sqnr(_reference(x, data, scale, zero, bias, fmt_name), out.float())
                assert quality >= 45, (config, m, quality)
    print(f"{fmt_name} {dtype}: configs out of shared memory: {too_large}")


@pytest.mark.parametrize("fmt_name", FORMATS)
def test_op_on_cuda_runs_the_kernel_zero_rows_and_nan(fmt_name):
    torch.manual_seed(1)
    data, scale, zero = _weight(fmt_name, 136, 256)
    for m in ROWS:
        x = torch.randn(2, m, 256, device="cuda", dtype=torch.bfloat16)
        x[0, 0] = 0
        x[1, -1, 7] = float("nan")
        out = torch.ops.lowbit.weight_only_mm(x, data, scale, zero, torch.empty(0, device="cuda"), None, fmt_name, x.dtype)
        expected = _reference(x, data, scale, zero, None, fmt_name)
        assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0]))
        assert out[1, -1].isnan().all()
        finite = ~expected.isnan()
        assert sqnr(expected[finite], out.float()[finite]) >= 45


def test_opcheck_on_cuda():
    torch.manual_seed(2)
    data, scale, zero = _weight("int4_g128_asym", 64, 256)
    x = torch.randn(5, 256, device="cuda", dtype=torch.bfloat16)
    plan = ops._weight_only_plan(x, data, "int4_g128_asym", None)
    torch.library.opcheck(
        torch.ops.lowbit.weight_only_mm_triton.default,
        (x, data, scale, zero, None, "int4_g128_asym", torch.bfloat16, plan),
    )
    torch.library.opcheck(
        torch.ops.lowbit.weight_only_mm.default,
        (x, data, scale, zero, torch.empty(0, device="cuda"), None, "int4_g128_asym", torch.bfloat16),
    )


LLAMA = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8, num_kv_heads=2)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("name", ["w4a16", "w8a16"])
def test_llama_output_code_holds_the_kernel_not_the_reference(name):
    torch.manual_seed(0)
    model = TinyLlama(LLAMA).eval().to("cuda", torch.bfloat16)
    tokens = torch.randint(0, LLAMA.vocab_size, (2, 64), device="cuda")
    with torch.no_grad():
        expected = model(tokens)
    logits, graphs = run_and_get_graphs(model, tokens, policy=name)
    code = graphs["output_code"]
    FileCheck().check("@triton.jit").check("def weight_only_kernel(").run(code)
    assert "torch.ops.lowbit.weight_only_mm.default(" not in code
    assert f"weight_only_mm [triton:{'w4a16' if name == 'w4a16' else 'w8a16'}]" in graphs["report"]
    assert sqnr(expected, logits) > (8 if name == "w4a16" else 25)


@pytest.mark.usefixtures("fresh_dynamo")
def test_dynamic_m_one_graph_every_bucket():
    """Decode (M=1..16) and prefill sizes through one compiled graph: the bucket launches switch per
    call without recompiling, and every size matches the reference op."""
    torch.manual_seed(3)
    layer = torch.nn.Linear(512, 320).to("cuda", torch.bfloat16).eval()
    compiled = torch.compile(layer, backend="lowbit", dynamic=True, options={"policy": "w4a16"})
    # The folded weight as the backend makes it (searched int4 scales, QuantSpec.weight_search).
    data, scale, zero, _ = quantize_weight(layer.weight, False, "int4_g128_asym")
    with torch.no_grad():
        for m in (2, 7, 16, 17, 100, 128, 129, 700, 5, 2):
            x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
            expected = _reference(x, data, scale, zero, layer.bias, "int4_g128_asym")
            assert sqnr(expected, compiled(x).float()) >= 45, m
    assert counters["stats"]["unique_graphs"] == 1


@pytest.fixture
def dequant_first(monkeypatch):
    """Every bucket above 128 rows defaults to a DEQUANT config (dequantize the weight, then a
    16-bit GEMM): a bucket's default is its first candidate. Plans are memoised per weight shape,
    so they are cleared before and after."""
    from lowbit_compile.kernels import weight_only

    fused_first = weight_only._candidates
    def dequant_configs_first(bucket_m, meta):
        return sorted(fused_first(bucket_m, meta), key=lambda c: -c.DEQUANT)

    monkeypatch.setattr(weight_only, "_candidates", dequant_configs_first)
    weight_only._plan.cache_clear()
    yield
    weight_only._plan.cache_clear()


@pytest.mark.usefixtures("fresh_dynamo", "dequant_first")
def test_dequant_buckets_static_and_dynamic():
    """A static M in a DEQUANT bucket: the dequantizing kernel and cuBLAS (an extern mm in the
    output code), no weight-only tile. Dynamic M: one graph for every M, the DEQUANT buckets as the
    dequantizing kernel and the 16-bit Triton tile, gated like every bucket. Both match the reference."""
    torch.manual_seed(4)
    layer = torch.nn.Linear(384, 200).to("cuda", torch.bfloat16).eval()
    data, scale, zero, _ = quantize_weight(layer.weight, False, "int4_g128_asym")
    with torch.no_grad():
        x = torch.randn(1100, 384, device="cuda", dtype=torch.bfloat16)
        out, graphs = run_and_get_graphs(layer, x, policy="w4a16")
        code = graphs["output_code"]
        FileCheck().check("def dequantize_kernel(").check("extern_kernels.").run(code)
        assert "def weight_only_kernel(" not in code
        assert sqnr(_reference(x, data, scale, zero, layer.bias, "int4_g128_asym"), out.float()) >= 45

        _, graphs = run_and_get_graphs(layer, x, policy="w4a16", dynamic=True)
        FileCheck().check("def dequantize_kernel(").check("def weight_only_kernel(").run(graphs["output_code"])
        graphs_before = counters["stats"]["unique_graphs"]
        compiled = torch.compile(layer, backend="lowbit", dynamic=True, options={"policy": "w4a16"})
        for m in (1100, 2, 130, 3000, 17, 1025, 600):
            x = torch.randn(m, 384, device="cuda", dtype=torch.bfloat16)
            expected = _reference(x, data, scale, zero, layer.bias, "int4_g128_asym")
            assert sqnr(expected, compiled(x).float()) >= 45, m
    assert counters["stats"]["unique_graphs"] == graphs_before + 1  # one graph for every M


@pytest.mark.usefixtures("fresh_dynamo")
def test_kmajor_weight_is_not_copied_per_call(monkeypatch):
    """Decode (M = 1, a graph of its own: Dynamo specialises sizes 0 and 1) runs the K-major GEMV,
    which writes its split-K counters into the packed scales; Inductor must not clone the scales
    for it (a copy kernel per call)."""
    monkeypatch.setenv(ops.KMAJOR_ENV, "1")
    layer = torch.nn.Linear(4096, 512, bias=False).to("cuda", torch.bfloat16).eval()
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    out, graphs = run_and_get_graphs(layer, x, policy="w4a16", dynamic=True)
    assert "kmajor" in graphs["folded"]
    data, scale, zero, _ = quantize_weight(layer.weight, False, "int4_g128_asym")
    assert sqnr(_reference(x, data, scale, zero, None, "int4_g128_asym"), out.float()) >= 45
    code = graphs["output_code"]
    assert "def gemv_kmajor_kernel(" in code
    call = code[code.index("def call(") :]
    assert "triton_poi" not in code and "clone" not in call and "copy_" not in call, call


# The K-major int4 GEMV (weight_only.gemv_kmajor_kernel; its inline-asm unpacking runs only here).
@pytest.mark.parametrize("fmt_name", ("int4_g32", "int4_g64_asym", "int4_g128", "int4_g128_asym"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_gemv_kmajor_every_candidate_matches_reference(fmt_name, dtype):
    from lowbit_compile.kernels import weight_only

    torch.manual_seed(1)
    group = get_format(fmt_name).group_size
    for n, k in ((200, 384), (4096, 4096 + 128)):  # N not a multiple of BLOCK_N; K not of every slice
        data, scale, zero = _weight(fmt_name, n, k)
        words, scale_t, zero_t = weight_only.pack_kmajor(data, scale, zero)
        bias = torch.randn(n, device="cuda", dtype=dtype)
        for config in (*weight_only.KMAJOR_GEMV_CANDIDATES, weight_only.KMajorGemvConfig(64, 16, 1)):
            for m in (1, 3):
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                for _ in range(2):  # twice: the split-K counters must be ready for the next call
                    out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                    weight_only.launch_gemv_kmajor(x, words, scale_t, zero_t, bias, out, group, config)
                    quality = sqnr(_reference(x, data, scale, zero, bias, fmt_name), out.float())
                    assert quality >= 45, (config, n, k, m, quality)
                assert not scale_t[-1].any(), config
