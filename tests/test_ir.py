"""Structure of the stage graphs: FileCheck on each stage, exact text where it matters, counters."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from expecttest import TestCase
from torch._dynamo.utils import counters
from torch.testing import FileCheck

from lowbit_compile.models import LlamaConfig, TinyLlama
from lowbit_compile.testing import run_and_get_graphs


@pytest.fixture(autouse=True)
def fresh_counters():
    counters.clear()


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(128, 256)
        self.down = nn.Linear(256, 128, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x)))


def _run(policy: str, **options):
    torch.manual_seed(0)
    model = Block().eval()
    return run_and_get_graphs(model, torch.randn(3, 5, 128), policy=policy, options=options)


def test_qdq_stage_has_explicit_quantize_dequantize_around_every_site() -> None:
    _, graphs = _run("w8a8", inductor=False)
    qdq = graphs["qdq"]
    FileCheck().check("# lowbit-compile stage: qdq").check("# policy: w8a8").run(qdq)
    # Per site: the weight's quantize -> dequantize, the activation's quantize -> dequantize, then linear.
    check = FileCheck()
    for _ in range(2):
        check = (
            check.check("torch.ops.lowbit.quantize.default(l_self_modules_")
            .check("'int8_row'")
            .check("torch.ops.lowbit.dequantize.default")
            .check("torch.ops.lowbit.quantize.default")
            .check("torch.ops.lowbit.dequantize.default")
            .check("torch._C._nn.linear(dequantize_default")
        )
    check.run(qdq)
    FileCheck().check_count("torch.ops.lowbit.quantize.default(", 4, exactly=True).run(qdq)


def test_folded_stage_reads_weights_from_compile_time_inputs() -> None:
    _, graphs = _run("w4a16", inductor=False)
    folded = graphs["folded"]
    FileCheck().check('folded_up_weight_int4_g128_asym_data: "u8[256, 64]"').check(
        'folded_down_weight_int4_g128_asym_scale: "f32[128, 2]"'
    ).run(folded)
    # No weight is quantized at run time any more; activations are not quantized in w4a16 at all.
    FileCheck().check_not("torch.ops.lowbit.quantize.default").run(folded)
    FileCheck().check_count("torch.ops.lowbit.dequantize.default(", 2, exactly=True).run(folded)


def test_fused_stage_replaces_each_matmul_with_one_lowbit_op() -> None:
    _, graphs = _run("fp8")
    fused = graphs["fused"]
    FileCheck().check_count("torch.ops.lowbit.scaled_mm.default(", 2, exactly=True).run(fused)
    FileCheck().check_not("torch._C._nn.linear").check_not("lowbit.dequantize").run(fused)
    # Activation quantization stays as its own (decomposable) op, feeding the fused matmul.
    FileCheck().check("torch.ops.lowbit.quantize.default(").check("'fp8_e4m3_row'").check(
        "torch.ops.lowbit.scaled_mm.default("
    ).run(fused)
    assert counters["lowbit"]["fused_scaled_mm"] == 2
    # Inductor fused the activation quantization into generated code and calls our op for the matmul.
    FileCheck().check("torch.ops.lowbit.scaled_mm.default(").run(graphs["output_code"])
    assert "lowbit.quantize" not in graphs["lowered"]
    assert re.search(r"aten\.amax", graphs["lowered"])


def test_counters_of_sites_per_kind() -> None:
    torch.manual_seed(0)
    model = TinyLlama(
        LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2)
    ).eval()
    _, graphs = run_and_get_graphs(
        model, torch.randint(0, 128, (1, 9)), policy="fp8-attention", options={"inductor": False}
    )
    assert counters["lowbit"]["fused_scaled_mm"] == 15
    assert counters["lowbit"]["fused_block_attention"] == 2  # fp8-attention: q, k, v quantized inside the op
    FileCheck().check_count("torch.ops.lowbit.block_attention.default(", 2, exactly=True).run(graphs["fused"])
    assert "sites by op {'linear': 15, 'attention': 2}" in graphs["report"]


class TestExactText(TestCase):
    def test_fused_weight_only_linear(self) -> None:
        torch.manual_seed(0)
        model = nn.Linear(128, 16, bias=False).eval()
        _, graphs = run_and_get_graphs(
            model, torch.randn(2, 128), policy="w8a16", options={"inductor": False, "compute_sqnr": False}
        )
        self.assertExpectedInline(
            graphs["fused"],
            """\
# lowbit-compile stage: fused
# made by: torch.compile(backend='lowbit')
# graph: 0_0
# policy: w8a16 (key e1527b8a13ff12a3)
# sites: 1
#   site 0 linear <root> [weight_only_mm_default]: A=16bit W=int8_row
class GraphModule(torch.nn.Module):
    def forward(self, L_fn_parameters_weight_: "f32[16, 128]", L_args_0_: "f32[2, 128]", folded_weight_int8_row_data: "i8[16, 128]", folded_weight_int8_row_scale: "f32[16, 1]", folded_weight_int8_row_zero_point: "f32[0]", folded_weight_int8_row_global_scale: "f32[0]"):
        l_fn_parameters_weight_ = L_fn_parameters_weight_
        l_args_0_ = L_args_0_

        # No stacktrace found for following nodes
        weight_only_mm_default: "f32[2, 16]" = torch.ops.lowbit.weight_only_mm.default(l_args_0_, folded_weight_int8_row_data, folded_weight_int8_row_scale, folded_weight_int8_row_zero_point, folded_weight_int8_row_global_scale, None, 'int8_row', torch.float32);  l_args_0_ = folded_weight_int8_row_data = folded_weight_int8_row_scale = folded_weight_int8_row_zero_point = folded_weight_int8_row_global_scale = None
        return (weight_only_mm_default,)
""",
        )


def test_int8_activation_quantization_is_one_single_use_chain_in_the_lowered_graph() -> None:
    """Every value from x / scale to the int8 cast has one use (its `= None` follows on the next
    line). A value read four times, as nan_to_num's decomposition reads the rounded codes, is
    stored in fp32 by Inductor (realize-on-reuse), and on CUDA the cast then ran as a pointwise
    kernel of its own instead of inside the producer's kernel (benchmarks/RESULTS.md)."""
    torch.manual_seed(0)
    model = TinyLlama(
        LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=1, num_heads=4, num_kv_heads=2)
    ).eval()
    _, graphs = run_and_get_graphs(model, torch.randint(0, 128, (2, 9)), policy="w8a8")
    lowered = graphs["lowered"]
    assert "isnan" not in lowered and "nan_to_num" not in lowered
    chain = re.compile(
        r"(\w+) = torch\.ops\.aten\.where\.self\(\w+, (div_\d+), \w+\);  [^\n]*\b\2 = [^\n]*None\n"
        r"\s*(\w+) = torch\.ops\.aten\.round\.default\(\1\);  \1 = None\n"
        r"\s*(\w+) = torch\.ops\.aten\.clamp_min\.default\(\3, -128\);  \3 = None\n"
        r"\s*(\w+) = torch\.ops\.aten\.clamp_max\.default\(\4, 127\);  \4 = None\n"
        r"\s*\w+ = torch\.ops\.prims\.convert_element_type\.default\(\5, torch\.int8\);  \5 = None"
    )
    sites = lowered.count("torch.ops.lowbit.scaled_mm.default(")
    # one chain per quantized activation: q/k/v share theirs, gate/up theirs (o, down, lm head: one each)
    assert sites == 8 and len(chain.findall(lowered)) == 5, lowered


def test_int8_activation_codes_are_stored_only_as_int8_by_inductor_lowering(monkeypatch) -> None:
    """No buffer Inductor lowers holds the rounded / clamped int8 codes in fp32: the chain from the
    amax to the int8 cast stays one unrealized pointwise, which the scheduler fuses into the producer.

    Inductor realizes any pointwise whose inlined body exceeds `realize_opcount_threshold` (30 on
    CUDA) ops, checked after every node: the int8 chain after an embedding + RMSNorm (layer 0's
    q/k/v) or a residual sum + RMSNorm (layer 1's gate/up, the LM head) reached 31-32 ops at
    clamp_min or clamp_max and was stored in fp32, and on the H100 the cast of k, v and up ran as a
    pointwise kernel of its own (`triton_poi_fused__to_copy_clamp_div_view`, `..._to_copy_div_view`). Lowering is the same on
    every device (a division by a constant is a multiply on CUDA: the same count), so this CPU run
    with CUDA's thresholds (CPU's are 50 / 12 from torch 2.13) sees the realizations; the CPU
    scheduler then fuses them back, so the output code would not show them. The GPU suite checks
    the kernels (tests/test_gpu_scaled_mm.py)."""
    import torch._inductor.config as inductor_config
    from torch._inductor import ir
    from torch._inductor.graph import GraphLowering

    stored_codes = []
    lower = GraphLowering.run

    def run(self, *args):
        result = lower(self, *args)
        for buffer in self.buffers:
            origins = {str(node.target) for node in buffer.get_origins()}
            if isinstance(buffer, ir.ComputedBuffer) and origins & {"aten.clamp_max.default", "aten.clamp_min.default"}:
                # an activation-sized value, not the (..., 1) scales (their origins can hold the chain's)
                if buffer.get_dtype() != torch.int8 and int(buffer.get_size()[-1]) != 1:
                    stored_codes.append((buffer.get_name(), buffer.get_dtype(), tuple(buffer.get_size())))
        return result

    monkeypatch.setattr(GraphLowering, "run", run)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8, num_kv_heads=2)
    model = TinyLlama(config).eval().to(torch.bfloat16)
    with inductor_config.patch(realize_opcount_threshold=30, realize_acc_reads_threshold=8):
        _, graphs = run_and_get_graphs(model, torch.randint(0, 512, (2, 64)), policy="w8a8")
    assert graphs["lowered"].count("torch.ops.lowbit.scaled_mm.default(") == 15
    assert stored_codes == []


@pytest.mark.parametrize("policy", ["w8a8", "fp8"])
def test_projections_of_one_activation_share_its_quantization(policy) -> None:
    """q/k/v (and gate/up) read one activation: the fused graph quantizes it once, so the producer's
    kernel writes the codes once, not once per projection (8 scaled GEMMs, 5 activations)."""
    model = TinyLlama(
        LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=1, num_heads=4, num_kv_heads=2)
    ).eval()
    _, graphs = run_and_get_graphs(model, torch.randint(0, 128, (2, 9)), policy=policy, options={"inductor": False})
    fused = graphs["fused"]
    assert fused.count("torch.ops.lowbit.scaled_mm.default(") == 8
    assert fused.count("torch.ops.lowbit.quantize.default(") == 5, fused
