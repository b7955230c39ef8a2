"""Compile the weight-only DEQUANT path for sm_90 (Hopper) on the CPU (`tests/_sm90.py`): the
dequantizing pass (`weight_only.dequantize_kernel`) for each weight layout it reads, and the 16-bit
tile (`weight_only_kernel` with BITS=16) at every DEQUANT candidate. What it holds in CI without a
GPU: they compile with Inductor's kind of signature, without spills (no local-memory loads or
stores in the SASS), and the 16-bit tile multiplies on Hopper's warpgroup MMA."""

from __future__ import annotations

import pytest
from _sm90 import compile_in_subprocess

triton = pytest.importorskip("triton")

SCRIPT = r'''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lowbit_compile.formats import get_format
from lowbit_compile.kernels import weight_only as W

def sass_facts(compiled):
    try:
        sass = compiled.asm["sass"]  # disassembled on first access (needs the wheel's nvdisasm)
    except Exception:  # noqa: BLE001
        sass = ""
    return {"has_sass": bool(sass), "local": sum(sass.count(op) for op in ("STL", "LDL")),
            "wgmma": compiled.asm["ttgir"].count("ttng.warp_group_dot ")}

def compile_case(case):
    dtype = case["dtype"]
    if case["kernel"] == "dequantize":
        fmt = get_format(case["fmt"])
        data = {4: "*i32" if case["kmajor"] else "*u8", 8: "*i8" if not fmt.is_float else "*u8"}[fmt.bits]
        fn = W.dequantize_kernel
        divisible = lambda name: name.startswith("stride") or name == "K"
        sig, attrs = signature_of(fn, {"w_ptr": data, "out_ptr": dtype}, divisible)
        group = fmt.group_size or 0
        block_n, block_k = W.DEQUANT_BLOCK
        cons = dict(GROUP=group, BITS=fmt.bits, FLOAT_CODES=fmt.is_float, ZERO_POINT=not fmt.symmetric,
                    KMAJOR=case["kmajor"], BLOCK_N=block_n, BLOCK_K=block_k)
        options = {"num_warps": 4, "num_stages": 1}
    else:
        fn = W.weight_only_kernel
        int4 = W.WeightMeta(4096, 4096, bits=4, group=128, float_codes=False, zero_point=True, kmajor=case["kmajor"])
        if case["kernel"] == "tile":  # the DEQUANT path's 16-bit tile
            meta, data, scales = W.dense_meta(int4), dtype, dtype
        else:  # a fused int4 tile (the group scales' loads are shared with the dequantizing pass)
            meta, data, scales = int4, "*i32" if case["kmajor"] else "*u8", "*fp32"
        pointers = {"x_ptr": dtype, "w_ptr": data, "scale_ptr": scales, "zero_ptr": scales, "bias_ptr": dtype,
                    "out_ptr": dtype}
        divisible = lambda name: name in ("N", "K", "K_SLICE") or name.startswith("stride")
        sig, attrs = signature_of(fn, pointers, divisible)
        config = W.WeightOnlyConfig.from_tuple(case["config"])
        cons = W.kernel_arguments(meta, config, has_bias=True)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    src = ASTSource(fn=fn, signature=sig, constexprs=cons, attrs=attrs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[-600:]}
    return sass_facts(compiled)

cases = json.loads(sys.stdin.read())
print(json.dumps([compile_case(c) for c in cases]))
'''


def test_dequantize_kernel_compiles_for_sm90_without_spills():
    cases = [
        dict(kernel="dequantize", fmt=fmt, kmajor=kmajor, dtype="*bf16")
        for fmt, kmajor in (("int4_g32", False), ("int4_g128_asym", False), ("int4_g128_asym", True),
                            ("int4_g64", True), ("int8_row", False), ("fp8_e4m3_row", False))
    ]  # fmt: skip
    cases.append(dict(kernel="dequantize", fmt="int4_g128_asym", kmajor=False, dtype="*fp16"))
    for case, result in zip(cases, compile_in_subprocess(SCRIPT, cases)):
        assert "error" not in result, (case, result.get("error"))
        if result["has_sass"]:
            assert result["local"] == 0, (case, result)


def test_dequant_tiles_compile_for_sm90_on_wgmma_without_spills():
    from lowbit_compile.kernels import weight_only

    meta = weight_only.WeightMeta(n=4096, k=4096, bits=4, group=128, float_codes=False, zero_point=True)
    configs = [c for c in weight_only._candidates(4096, meta) if c.DEQUANT]
    assert len(configs) >= 3
    cases = [dict(kernel="tile", config=list(c.as_tuple()), dtype="*bf16", kmajor=False) for c in configs]
    cases.append(dict(kernel="tile", config=list(configs[0].as_tuple()), dtype="*fp16", kmajor=False))
    for case, result in zip(cases, compile_in_subprocess(SCRIPT, cases)):
        assert "error" not in result, (case, result.get("error"))
        assert result["wgmma"] > 0, (case, result)
        if result["has_sass"]:
            assert result["local"] == 0, (case, result)


@pytest.mark.parametrize("kmajor", [False, True])
def test_fused_int4_tiles_compile_for_sm90(kmajor):
    """Fused int4 tiles (scale after the dot, swapped; dequantized in registers) still compile with
    the group-scale loads they share with the dequantizing pass."""
    configs = [(16, 64, 128, 4, 3, 1, 1, 0), (128, 128, 64, 8, 3, 1, 0, 0)]
    cases = [dict(kernel="fused", config=list(c), dtype="*bf16", kmajor=kmajor) for c in configs]
    for case, result in zip(cases, compile_in_subprocess(SCRIPT, cases)):
        assert "error" not in result, (case, result.get("error"))
        assert result["wgmma"] > 0, (case, result)
